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
    "augment.caption_queries=true directions=[i2t]": ["augment.caption_queries", "t2i"],
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
