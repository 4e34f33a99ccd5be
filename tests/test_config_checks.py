"""Every bad value and impossible combination is refused when the config is composed, before any work.

Each case runs the real ``gcr fit --cfg`` entry point (in-process: the same code path as the console
script, without a new interpreter per case) and checks the exit code and that the message names the key
the user sets and a fix. One case runs as a real subprocess to check that no traceback reaches the user.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gcr.cli import main

CASES = {
    # values
    "scheme=hkmeans scheme.k=abc": ["scheme.k='abc'", "must be an integer"],
    "trainer.max_epochs=2.5": ["trainer.max_epochs=2.5", "must be an integer"],
    "trainer.max_epochs=0": ["trainer.max_epochs=0", ">= 1"],
    "trainer.lr=0": ["trainer.lr=0", "> 0"],
    "decoding.num_beams=0": ["decoding.num_beams", ">= 1"],
    "directions=[t2x]": ["directions", "t2i, i2t"],
    "eval.ks=[0,5]": ["eval.ks", "positive integers"],
    "wandb.enabled=maybe": ["wandb.enabled", "true or false"],
    "data=flickr30k": ["data=flickr30k needs", "data.json", "data.images", "data.json=VALUE"],
    "data.json=/tmp/dataset_flickr30k.json": ["data.json is not a key", "data=flickr30k", "Select one first"],
    "scheme=hkmeans scheme.leaf_size=0": ["scheme=hkmeans", "leaf_size", "scheme.OPTION=VALUE"],
    "scheme=hkmeans +scheme.nope=1": ["unknown option", "nope", "hkmeans"],
    # combinations
    "dense=pretrained": ["model.vision_init=dense", "dense=pretrained", "model.vision_init=random"],
    "model=cart model.vision_init=dense": ["model.vision_init=dense", "model=cart", "model.vision_init=none"],
    "model=cart scheme=semcore": ["scheme=semcore", "words", "model=cart", "model=tiny"],
    "model=cart scheme=ssi": ["scheme=ssi", "model=cart"],
    "model=cart scheme=hkmeans gsv.enabled=true": ["gsv.enabled=true", "model=cart", "gsv.enabled=false"],
    "scheme=atomic rgs.enabled=true": ["rgs.enabled=true", "scheme=atomic", "scheme=ssi"],
    "model=cart scheme=hkmeans scheme.k=4 rgs.enabled=true": ["rgs.enabled=true"],
    "scheme=ssi scheme.generator=mllm model=cart": ["scheme=ssi", "model=cart"],
    "scheme=ssi scheme.generator=llm scheme.llm_attempts=0": ["scheme.llm_attempts", ">= 1"],
    "data=feature_items data.json=a.json data.features=f model=tiny": ["model=tiny", "feature items", "model=cart"],
    "data=feature_items data.json=a.json data.features=f model=cart": ["dense=clip_tiny", "dense=pretrained"],
    "augment.pseudo_queries=2 directions=[i2t]": ["augment.pseudo_queries", "t2i"],
    "augment.pseudo_queries=-1": ["augment.pseudo_queries"],
    "augment.caption_queries=true": ["renamed", "augment.pseudo_queries=N"],
    # the old names of each group's implementation selector (now name everywhere)
    "features.encoder=pretrained": ["features.encoder was renamed", "features.name=VALUE", "with name"],
    "dense.type=pretrained": ["dense.type was renamed", "dense.name=VALUE"],
    "description.source=heldout": ["description.source was renamed", "description.name=VALUE"],
    "data.type=karpathy": ["data.type was renamed", "data.name=VALUE", "data.dataset"],
    "data.name=clotho": ["data.name=clotho is not a dataset loader", "shapes", "data.dataset=clotho"],
    "description.name=oracle": ["unknown description.name='oracle'", "heldout"],
}


@pytest.mark.parametrize("args", sorted(CASES))
def test_refused_at_compose_with_key_and_fix(args, capsys, tmp_path):
    code = main(["fit", "--cfg", f"output_dir={tmp_path}", *args.split()])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("gcr: error: ") and err.count("gcr:") == 1
    for expected in CASES[args]:
        assert expected in err, (expected, err)
    assert not (tmp_path).exists() or not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args", [
    "model=cart scheme=hkmeans",  # the compact CART decoder with numeric IDs
    "dense=pretrained model.vision_init=random",
    "scheme=ssi rgs.enabled=true",
    "scheme=ssi scheme.generator=llm model=compact",  # the identifier writer is a model of its own
    "trainer.limit_train_batches=5",  # an int where the default is a float
    "data=feature_items data.json=a.json data.features=f model=cart dense=pretrained",
])
def test_valid_combinations_compose(args, capsys):
    assert main(["fit", "--cfg", *args.split()]) == 0, capsys.readouterr().err


def test_no_traceback_reaches_the_user(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gcr.cli", "fit", "scheme=hkmeans", "scheme.k=abc"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "scheme.k" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no data generated, no run folder made


def test_a_config_file_with_the_old_selector_keys_is_refused_with_the_new_names(tmp_path, capsys):
    """A user's own config folder written before the rename (data.type + data.name as the label)."""
    import shutil
    from pathlib import Path

    cdir = tmp_path / "configs"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", cdir)
    (cdir / "data" / "mine.yaml").write_text("type: shapes\nname: mine\nroot: data/mine\nnum_images: 40\n"
                                             "seed: 0\nimage_size: 32\ncheck_images: open\n")
    code = main(["fit", "--cfg", "--config-dir", str(cdir), "data=mine", f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "data.type" in err and "renamed data.name" in err and "data.dataset" in err
