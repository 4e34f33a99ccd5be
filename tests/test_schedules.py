"""The learning-rate schedule every trained part of gcr uses: sound for every budget of one step or more."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcr.cli import compose, config_dir
from gcr.errors import ConfigError
from gcr.train.schedules import lr_factor, warmup_decay, warmup_steps

BASE_LR = 2e-3


def _lrs(total: int, **schedule) -> tuple[list[float], float]:
    """The LR of each of ``total`` real optimizer steps, and the LR left after the last one."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=BASE_LR)
    scheduler = warmup_decay(optimizer, total, **schedule)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        weight.sum().backward()
        optimizer.step()
        scheduler.step()
    return seen, optimizer.param_groups[0]["lr"]


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 200),
    ratio=st.floats(0.0, 1.0),
    final=st.floats(0.0, 1.0),
    decay=st.sampled_from(["cosine", "linear"]),
)
def test_every_budget_gives_a_sound_schedule(total, ratio, final, decay):
    lrs, after = _lrs(total, warmup_ratio=ratio, final_ratio=final, decay=decay)
    warmup = warmup_steps(total, ratio)
    assert len(lrs) == total and 0 <= warmup < total
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs), "every step of the budget learns"
    assert math.isfinite(after) and after >= 0
    assert max(lrs) <= BASE_LR * (1 + 1e-9), "the peak never exceeds the base LR"
    assert lrs[warmup] == pytest.approx(BASE_LR), "the peak is reached inside the budget"
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1])), "warm-up rises strictly"
    assert all(a >= b * (1 - 1e-12) for a, b in zip(lrs[warmup:], lrs[warmup + 1 :])), "decay never rises"
    assert after == pytest.approx(final * BASE_LR, abs=1e-15), "the decay ends at final_ratio"


def test_the_budget_that_broke_onecycle_warms_up_then_decays():
    """10 steps at 10% warm-up: OneCycleLR divided by a zero-length phase here."""
    lrs, _ = _lrs(10, warmup_ratio=0.1, final_ratio=0.0)
    assert warmup_steps(10, 0.1) == 1
    assert lrs[0] == pytest.approx(BASE_LR / 2) and lrs[1] == pytest.approx(BASE_LR)
    assert lrs[-1] < lrs[1] / 10


def test_one_step_is_the_full_base_lr():
    for ratio in (0.0, 0.05, 0.5, 1.0):
        assert _lrs(1, warmup_ratio=ratio)[0] == [pytest.approx(BASE_LR)]
    assert lr_factor(0, 1, 0) == 1.0


@pytest.mark.parametrize("bad", [dict(warmup_ratio=1.5), dict(warmup_ratio=-0.1), dict(final_ratio=2.0),
                                 dict(decay="step")])
def test_bad_schedule_options_name_the_problem(bad):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match=next(iter(bad)).split("_")[0]):
        warmup_decay(optimizer, 10, **bad)
    with pytest.raises(ValueError, match="steps >= 1"):
        warmup_decay(optimizer, 0)


class _LRs(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_dense_baseline_trains_on_the_budget_that_crashed_it(tmp_path):
    """``trainer.limit_train_batches=5 dense.max_epochs=2``: 10 steps, a ZeroDivisionError in OneCycleLR before."""
    from gcr.data.sources import load_dataset
    from gcr.dense import setup as dense_setup
    from gcr.dense.models import DualEncoder
    from gcr.dense.training import DenseModule, pair_loader
    from gcr.models.tokenizer import corpus_tokenizer
    from gcr.train.trainer import build_trainer

    cfg = compose([f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "data.num_images=40",
                   "trainer.limit_train_batches=5", "dense.max_epochs=2", "dense.batch_size=8",
                   "dense.vision_layers=1", "dense.text_layers=1"], config_dir())
    corpus = load_dataset(cfg.data)
    # the pipeline's own path (train, save to the cache) ...
    encoder, seconds = dense_setup.dense_baseline(cfg, corpus)
    assert seconds > 0 and (dense_setup.dense_dir(cfg, corpus) / "done.json").is_file()
    # ... and the LR it stepped through, read from a real trainer on the same budget
    d = cfg.dense
    module = DenseModule(DualEncoder(corpus_tokenizer(corpus, d.vocab_size), image_size=d.image_size,
                                     patch_size=d.patch_size, vision_hidden_size=d.vision_hidden_size, vision_layers=1,
                                     text_hidden_size=d.text_hidden_size, text_layers=1, embed_dim=d.embed_dim,
                                     max_text_tokens=d.max_text_tokens), lr=d.lr)
    lrs = _LRs()
    trainer = build_trainer(cfg, max_epochs=2, run_dir=tmp_path / "dense", callbacks=[lrs])
    trainer.fit(module, pair_loader(corpus, 8, 0))
    assert trainer.global_step == 10 and len(lrs.seen) == 10
    assert lrs.seen == pytest.approx([d.lr * lr_factor(i, 10, 1) for i in range(10)])


@pytest.mark.parametrize("epochs", [1, 3])
def test_the_generative_module_trains_on_one_or_a_few_steps(tmp_path, epochs):
    """The module behind every scheme, GSV and the captioner: a real tiny backbone, 1 or 3 optimizer steps."""
    from gcr.data.sources import load_shapes
    from gcr.descriptions.captioners import BackboneCaptioner, train_caption_pairs
    from gcr.models.tiny import TinyBackbone
    from gcr.train.captioner import fit_captioner

    corpus = load_shapes(str(tmp_path / "shapes"), num_images=10, image_size=32)
    backbone = TinyBackbone.create(corpus, vocab_size=200, hidden_size=32, num_layers=1, num_heads=2,
                                   vision_hidden_size=32, vision_layers=1, image_size=32, patch_size=8)
    pairs = train_caption_pairs(corpus)
    captioner = BackboneCaptioner(backbone, max_caption_tokens=8)
    history = fit_captioner(captioner, pairs, max_epochs=epochs, batch_size=len(pairs), lr=1e-3, accelerator="cpu")
    assert len(history) == epochs and all(math.isfinite(x) for x in history)
