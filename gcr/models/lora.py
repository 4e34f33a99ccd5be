"""LoRA options for the backbones that fine-tune a pretrained LLM through ``peft`` (``hf``, ``smol``).

Each backbone keeps its own defaults, which also name the options it knows (``hf`` adds
``modules_to_save``); :func:`lora_options` fills and checks ``model.lora`` against them the same way for
every backbone, and :func:`lora_config` turns the result into a ``peft.LoraConfig``. ``peft`` is imported
only by :func:`lora_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gcr.errors import ConfigError


def lora_options(lora: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``lora`` over ``defaults`` (``None``: the defaults), checked; unknown keys are a :class:`ConfigError`.

    ``target_modules`` is a non-empty list of module names or a string (``all-linear`` or a PEFT regex);
    ``modules_to_save`` (where the backbone knows it) is ``None`` or a list of module names.
    """
    if lora is None:
        lora = {}
    if not isinstance(lora, Mapping):
        raise ConfigError(f"model.lora must be a mapping of LoRA options, got {type(lora).__name__}")
    unknown = sorted(set(lora) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown model.lora option(s) {unknown}; known: {sorted(defaults)}")
    out = {**defaults, **lora}
    if isinstance(out["target_modules"], (list, tuple)):
        out["target_modules"] = [str(t) for t in out["target_modules"]]
        if not out["target_modules"]:
            raise ConfigError(
                "model.lora.target_modules is empty; name modules (e.g. [q_proj, v_proj]) or use all-linear"
            )
    elif not isinstance(out["target_modules"], str):
        raise ConfigError("model.lora.target_modules must be a list of module names, 'all-linear' or a regex")
    if int(out["r"]) < 1:
        raise ConfigError(f"model.lora.r={out['r']!r}: use an integer >= 1")
    if out.get("modules_to_save") is not None:
        out["modules_to_save"] = [str(m) for m in out["modules_to_save"]]
    return out


def lora_config(options: Mapping[str, Any], target_modules: list[str] | str, **extra: Any) -> Any:
    """The ``peft.LoraConfig`` for checked ``options`` (rank, alpha, dropout; no bias) on ``target_modules``.

    ``extra`` goes to ``LoraConfig`` as is (``trainable_token_indices``, ``modules_to_save``, ``task_type``).
    """
    from peft import LoraConfig

    return LoraConfig(
        r=int(options["r"]),
        lora_alpha=float(options["alpha"]),
        lora_dropout=float(options["dropout"]),
        target_modules=target_modules,
        bias="none",
        **extra,
    )
