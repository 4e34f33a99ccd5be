"""Rationale-Guided Supervision (RGS): identifier + separator + a one-sentence rationale, as one target.

Training target of a query: ``<identifier tokens> <sep> <rationale tokens> <eos>``. The identifier part
(separator included) and the rationale part have separate losses, ``loss = id + weight * rationale``;
prompt tokens carry no label. The index ends every identifier with ``<sep>`` instead of EOS
(:meth:`gcr.index.IdentifierIndex.tokenize`), so constrained decoding stops at the separator and the
rationale costs nothing at retrieval time; :func:`explain` generates it on demand.

Rationales come from the scheme (:meth:`gcr.schemes.ssi.SsiScheme.rationales`: the MLLM's sentence or
one templated from the identifier's fields).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gcr.data.corpus import Content
from gcr.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class RationaleSupervision:
    """What RGS needs at training time: the separator token and each target's rationale token ids (+ EOS)."""

    separator: str
    separator_id: int
    weight: float
    token_ids: dict[str, tuple[int, ...]]  # target id -> rationale tokens, ending with EOS


def separator_token_id(tokenizer: Any, separator: str) -> int:
    """The single token id of ``separator``; an error when the tokenizer splits it or does not know it."""
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise ConfigError(
            f"rgs.separator={separator!r} is {len(ids)} tokens under the model's tokenizer; choose a separator that "
            "is one known token (e.g. ';')"
        )
    return int(ids[0])


def supervision(
    tokenizer: Any,
    identifiers: Sequence[str],
    rationales: Mapping[str, str] | None,
    *,
    separator: str,
    weight: float,
    scheme: str,
    max_tokens: int = 48,
) -> RationaleSupervision:
    """Check the separator against the identifiers and tokenize every target's rationale."""
    if not rationales:
        raise ConfigError(
            f"rgs.enabled=true needs rationales, and scheme {scheme!r} gives none; use scheme=ssi or set rgs.enabled=false"
        )
    sep_id = separator_token_id(tokenizer, separator)
    clash = [i for i in identifiers if separator in i.split()]
    if clash:
        raise ConfigError(
            f"rgs.separator={separator!r} occurs inside identifiers (e.g. {clash[0]!r}); decoding could not tell where "
            "an identifier ends: choose another rgs.separator"
        )
    empty = [t for t, r in rationales.items() if not r.strip()]
    if empty:
        raise ConfigError(f"{len(empty)} targets have an empty rationale (e.g. {empty[:3]})")
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(rationales.values()), add_special_tokens=False)["input_ids"]
    token_ids = {t: (*ids[:max_tokens], eos) for t, ids in zip(rationales, encoded)}
    return RationaleSupervision(separator, sep_id, float(weight), token_ids)


def rationale_mask(width: int, lengths: Sequence[int]) -> torch.Tensor:
    """``(B, width)`` bool: True on the last ``lengths[i]`` positions of row ``i`` (left-padded rows end there)."""
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for i, n in enumerate(lengths):
        if n:
            mask[i, width - n:] = True
    return mask


def rgs_loss(
    logits: torch.Tensor, labels: torch.Tensor, rationale: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, identifier loss, rationale loss)``: mean token cross-entropy of each part, ``id + weight * rationale``.

    ``labels`` align with the inputs (``IGNORE_INDEX`` on prompt and padding), as for HF causal LMs: position
    ``t``'s logits predict label ``t + 1``. ``rationale`` marks the rationale's label positions.
    """
    predicted, target = logits[:, :-1].float(), labels[:, 1:]
    is_rationale = rationale[:, 1:]
    token_loss = F.cross_entropy(predicted.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    labelled = target != IGNORE_INDEX
    id_part, rationale_part = labelled & ~is_rationale, labelled & is_rationale
    id_loss = (token_loss * id_part).sum() / id_part.sum().clamp(min=1)
    rationale_loss = (token_loss * rationale_part).sum() / rationale_part.sum().clamp(min=1)
    return id_loss + weight * rationale_loss, id_loss, rationale_loss


@torch.no_grad()
def continue_text(
    backbone: Any, contents: Sequence[Content], prefixes: Sequence[Sequence[int]], *, max_new_tokens: int = 48,
    num_beams: int = 3,
) -> list[str]:
    """Free text that ``backbone`` writes after each content's prompt followed by ``prefixes[i]`` (token ids).

    Used to write a rationale after a decoded identifier (``prefix = identifier + separator``), and to
    prompt an MLLM with an image plus a text instruction (``prefix = instruction tokens``).
    """
    device = next(backbone.parameters()).device
    batch = backbone.batch(contents, [list(p) for p in prefixes])
    batch.pop("labels", None)
    return backbone.generate_text({k: v.to(device) for k, v in batch.items()}, num_beams=num_beams,
                                  max_new_tokens=max_new_tokens)


def mllm_answerer(backbone: Any, *, batch_size: int = 16, max_new_tokens: int = 48) -> Any:
    """``(targets, prompts) -> answers`` for ``ssi`` with ``generator=mllm``: the backbone reads each target
    (an image, or a text) and then the prompt's tokens, and writes the answer."""
    tok = backbone.tokenizer

    def answer(targets: Sequence[Any], prompts: Sequence[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(targets), batch_size):
            chunk = range(start, min(start + batch_size, len(targets)))
            prefixes = tok([prompts[i] for i in chunk], add_special_tokens=False)["input_ids"]
            out += continue_text(backbone, [targets[i].content for i in chunk], prefixes,
                                 max_new_tokens=max_new_tokens)
        return out

    return answer


def explain(
    backbone: Any, contents: Sequence[Content], identifier_token_ids: Sequence[Sequence[int]], *,
    max_new_tokens: int = 48,
) -> list[str]:
    """The rationale the model writes after each query's identifier (token ids ending with the separator)."""
    return continue_text(backbone, contents, identifier_token_ids, max_new_tokens=max_new_tokens)
