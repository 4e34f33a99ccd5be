"""The one LoRA option parser shared by the ``hf`` and ``smol`` backbones (gcr.models.lora)."""

from __future__ import annotations

import pytest

from gcr.errors import ConfigError
from gcr.models.hf import LORA_DEFAULTS
from gcr.models.lora import lora_config, lora_options
from gcr.models.smol import DEFAULT_LORA


def test_defaults_fill_in_and_overrides_win():
    assert lora_options(None, LORA_DEFAULTS) == LORA_DEFAULTS
    out = lora_options({"r": 4, "target_modules": ("q_proj",)}, DEFAULT_LORA)
    assert out == {**DEFAULT_LORA, "r": 4, "target_modules": ["q_proj"]}


def test_each_backbone_knows_only_its_own_options():
    assert lora_options({"modules_to_save": ["lm_head"]}, LORA_DEFAULTS)["modules_to_save"] == ["lm_head"]
    with pytest.raises(ConfigError, match=r"unknown model.lora option\(s\) \['modules_to_save'\]"):
        lora_options({"modules_to_save": ["lm_head"]}, DEFAULT_LORA)


def test_a_string_target_is_kept_as_a_regex():
    assert lora_options({"target_modules": "all-linear"}, DEFAULT_LORA)["target_modules"] == "all-linear"


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (["r", 4], "must be a mapping"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": 3}, "list of module names"),
        ({"r": 0}, r"model.lora.r=0"),
    ],
)
def test_bad_options_are_config_errors(lora, message):
    with pytest.raises(ConfigError, match=message):
        lora_options(lora, LORA_DEFAULTS)


def test_lora_config_carries_the_options():
    pytest.importorskip("peft")
    config = lora_config(lora_options({"r": 4, "alpha": 8, "dropout": 0.0}, DEFAULT_LORA), ["q_proj"])
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (4, 8.0, 0.0, "none")
    assert set(config.target_modules) == {"q_proj"}
