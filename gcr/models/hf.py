"""Backbone ``hf``: any Hugging Face image-text-to-text checkpoint, by hub name or local folder.

The checkpoint is loaded with ``AutoProcessor`` and ``AutoModelForImageTextToText`` (LLaVA, LLaVA-Next,
Qwen2-VL, Idefics3/SmolVLM, Gemma 3, ...). Queries are written into a prompt -- through the processor's
chat template when it has one, else a plain template -- and the processor turns images into pixel inputs and
expands the image placeholder into the model's image tokens. The identifier tokens (ending with EOS) are
appended after the prompt (after the assistant turn's opening when a chat template is used), so training and
constrained decoding see the same positions.

Fine-tuning is LoRA on the language model only (via ``peft``), with the rows of the new identifier tokens in
the input and output embeddings trainable as well (PEFT's ``trainable_token_indices``); ``lora.enabled=false``
trains the whole model instead.

Saving writes the processor, the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) or the full
model when LoRA is off, and ``backbone.json``; :meth:`HFBackbone.from_pretrained` reloads the base model from
the recorded ``path``, resizes it to the saved tokenizer and loads the adapter. Everything loads from
safetensors; pickled weights are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcr.data.corpus import Content
from gcr.errors import ArtifactError, ConfigError, DataError
from gcr.models.base import BACKBONE_FILE, IGNORE_INDEX, GenerativeBackbone, unreadable_modality
from gcr.models.lora import lora_config, lora_options

#: ``{query}`` is replaced by the query: the caption text, or the image (a chat template's image item, or the
#: processor's image token in a plain prompt). The identifier follows the prompt (with a chat template: after
#: the generation prompt that opens the assistant's turn).
DEFAULT_PROMPT = "{query}\nIdentifier of the matching item:"

LORA_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "r": 8,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "modules_to_save": None,
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_dtype(dtype: str) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU; else one of float32/bfloat16/float16 (or fp32/bf16/fp16)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown model.dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def _load_kwargs(path: str, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if Path(path).is_dir():
        kwargs["local_files_only"] = True  # a folder needs no network (and must not fall back to the hub)
    return kwargs


def _load_processor(path: str, trust_remote_code: bool):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, **_load_kwargs(path, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a processor from model.path={path!r}: {exc}") from exc
    if not hasattr(processor, "tokenizer") or processor.tokenizer is None:
        raise ConfigError(
            f"model.path={path!r} has no multimodal processor (AutoProcessor gave {type(processor).__name__}); "
            "the hf backbone needs an image-text-to-text checkpoint with a processor config"
        )
    return processor


def _load_model(path: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, use_safetensors=True, **_load_kwargs(path, trust_remote_code)
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load an image-text-to-text model (safetensors weights) from model.path={path!r}: {exc}"
        ) from exc


def _unwrap(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _module_name(root: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in root.named_modules() if m is module), None)


class HFBackbone(GenerativeBackbone):
    """A pretrained HF vision-language checkpoint (hub name or folder), LoRA on its language model."""

    name = "hf"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        path: str,
        lora: dict[str, Any],
        dtype: str = "auto",
        max_text_tokens: int = 64,
        prompt: str = DEFAULT_PROMPT,
        image_size: int | None = None,
        trust_remote_code: bool = False,
    ):
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:  # e.g. Llama tokenizers; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {path!r} has no EOS token; identifiers must end with one")
        super().__init__(model, tokenizer, max_text_tokens=max_text_tokens)
        self.processor = processor
        self.path = path
        self.lora = lora
        self.dtype = dtype
        self.prompt = prompt
        self.image_size = None if image_size is None else int(image_size)
        self.trust_remote_code = bool(trust_remote_code)
        self._prompt_head, self._prompt_tail = _split_prompt(prompt)
        base = _unwrap(model)
        inner = getattr(base, "model", None)
        # Qwen2-VL-style multimodal RoPE: the model computes 3D positions for image prompts itself
        self._mrope = any(hasattr(m, "get_rope_index") for m in (base, inner) if m is not None)
        self._new_token_ids: list[int] = []

    @property
    def uses_mrope(self) -> bool:
        """Whether the model uses multimodal rotary positions (Qwen2-VL style, ``get_rope_index``).

        Image prompts are then batched with the model's own 3D position ids.
        """
        return self._mrope

    @property
    def new_token_ids(self) -> tuple[int, ...]:
        """The ids of the identifier tokens added to the vocabulary (their embedding rows train under LoRA)."""
        return tuple(self._new_token_ids)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        corpus: Any = None,
        *,
        path: str | None = None,
        lora: dict[str, Any] | None = None,
        dtype: str = "auto",
        max_text_tokens: int = 64,
        prompt: str = DEFAULT_PROMPT,
        image_size: int | None = None,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> HFBackbone:
        """Load ``path`` (a hub name or a local folder); ``corpus`` is unused (the checkpoint has its tokenizer).

        ``lora``: ``{enabled, r, alpha, dropout, target_modules, modules_to_save}`` over :data:`LORA_DEFAULTS`
        (``None``: the defaults). ``target_modules`` are leaf names inside the language model, ``all-linear``
        (every linear layer of the language model) or a PEFT regex used verbatim.
        """
        if unknown:
            raise ConfigError(
                f"unknown option(s) {sorted(unknown)} for model 'hf'; known: dtype, image_size, lora, "
                "max_text_tokens, path, prompt, trust_remote_code"
            )
        if path is None or not str(path).strip() or str(path) == "???":
            raise ConfigError(
                "model 'hf' needs a checkpoint: pass model.path=<hub name or folder> "
                "(e.g. model.path=llava-hf/llava-interleave-qwen-0.5b-hf or model.path=/models/my-vlm)"
            )
        path = str(path)
        if Path(path).expanduser().is_dir():
            path = str(Path(path).expanduser().resolve())  # recorded in backbone.json: independent of the cwd
        elif path.startswith((".", "/", "~")):
            raise ConfigError(f"model.path={path!r} is not a folder; pass model.path=<hub name or folder>")
        lora = lora_options(lora, LORA_DEFAULTS)
        _split_prompt(prompt)  # fail fast on a malformed prompt
        processor = _load_processor(path, trust_remote_code)
        model = _load_model(path, resolve_dtype(dtype), trust_remote_code)
        backbone = cls(
            model, processor, path=path, lora=lora, dtype=dtype, max_text_tokens=max_text_tokens,
            prompt=prompt, image_size=image_size, trust_remote_code=trust_remote_code,
        )  # fmt: skip
        if lora["enabled"]:
            backbone.model = backbone._wrap_lora(model)
        return backbone

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, trainable: bool = False) -> HFBackbone:
        """Reload what :meth:`save` wrote. ``trainable``: keep the adapter trainable (to continue training)."""
        directory = Path(directory)
        try:
            options = json.loads((directory / BACKBONE_FILE).read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"{directory} has no {BACKBONE_FILE}; it is not a saved hf backbone"
            ) from None
        name = options.pop("name", "hf")
        if name != "hf":
            raise ArtifactError(
                f"{directory} holds a {name!r} backbone, not 'hf'; load it with that backbone"
            )
        new_token_ids = options.pop("new_token_ids", [])
        lora = lora_options(options.get("lora"), LORA_DEFAULTS)
        trust = bool(options.get("trust_remote_code", False))
        processor = _load_processor(str(directory), trust)
        dtype = resolve_dtype(options.get("dtype", "auto"))
        if lora["enabled"]:
            from peft import PeftModel

            if not (directory / ADAPTER_WEIGHTS).is_file():
                raise ArtifactError(
                    f"{directory} has no {ADAPTER_WEIGHTS}; re-save the backbone (pickled adapters are not loaded)"
                )
            base = _load_model(options["path"], dtype, trust)
            if base.get_input_embeddings().weight.shape[0] != len(processor.tokenizer):
                # the new rows are overwritten by the adapter's trainable tokens
                base.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
            model = PeftModel.from_pretrained(base, directory, is_trainable=trainable)
        else:
            model = _load_model(str(directory), dtype, trust)
        backbone = cls(model, processor, **options)
        backbone._new_token_ids = list(new_token_ids)
        return backbone

    # -- LoRA ---------------------------------------------------------------------------------
    def _language_model_prefix(self, model: nn.Module) -> str:
        decoder = None
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            pass
        name = _module_name(model, decoder) if decoder is not None and decoder is not model else None
        if not name:
            for candidate in ("model.language_model", "language_model", "model.text_model", "text_model"):
                if any(n == candidate for n, _ in model.named_modules()):
                    return candidate
            raise ConfigError(
                f"cannot find the language model inside {type(model).__name__} to put LoRA on; pass "
                "model.lora.target_modules as a PEFT regex over module names"
            )
        return name

    def _lora_target_regex(self, model: nn.Module) -> str:
        targets = self.lora["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            return targets  # a PEFT regex, used verbatim
        prefix = self._language_model_prefix(model)
        scope = [(n, m) for n, m in model.named_modules() if n.startswith(prefix + ".")]
        if targets == "all-linear":
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in scope if isinstance(m, nn.Linear)})
        else:
            leaves = list(targets)
        found = {n.rsplit(".", 1)[-1] for n, _ in scope} & set(leaves)
        if not found:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in scope if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"model.lora.target_modules {targets} match no module of the language model ({prefix}); "
                f"its linear layers are named {linear}"
            )
        return rf"{re.escape(prefix)}\.(?:.*\.)?(?:{'|'.join(re.escape(t) for t in sorted(found))})"

    def _token_targets(self, model: nn.Module) -> tuple[dict[str, list[int]] | None, list[str]]:
        """``trainable_token_indices`` for the new tokens' rows, or embedding modules to train whole."""
        if not self._new_token_ids:
            return None, []
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        embed_name = _module_name(model, embed)
        head_name = _module_name(model, head) if head is not None else None
        ids = sorted(self._new_token_ids)
        usable = isinstance(embed, nn.Embedding) and embed_name
        head_usable = head is None or (isinstance(head, nn.Linear) and head.bias is None and head_name)
        if usable and head_usable:
            indices = {embed_name: ids}
            if head is not None:  # with tied weights PEFT ties the head's rows to the embedding's
                indices[head_name] = ids
            return indices, []
        return None, [n for n in (embed_name, head_name) if n]  # unusual layers: train them whole

    def _wrap_lora(self, model: nn.Module) -> Any:
        from peft import get_peft_model

        token_indices, whole = self._token_targets(model)
        modules_to_save = list(self.lora["modules_to_save"] or []) + whole
        config = lora_config(
            self.lora,
            self._lora_target_regex(model),
            modules_to_save=modules_to_save or None,
            trainable_token_indices=token_indices,
        )
        return get_peft_model(model, config)

    # -- vocabulary ---------------------------------------------------------------------------
    def add_identifier_tokens(self, tokens: Sequence[str]) -> int:
        """Add the tokens the tokenizer lacks; new embedding rows start at the old rows' mean (HF mean resizing).

        With LoRA the adapter is rebuilt so that the new rows (input and output embeddings) are trainable;
        LoRA weights and earlier trainable rows are carried over.
        """
        from peft import PeftModel

        vocab = self.tokenizer.get_vocab()
        missing = list(dict.fromkeys(t for t in tokens if t not in vocab))
        if not missing:
            return 0
        added = self.tokenizer.add_tokens(missing, special_tokens=False)
        new_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in missing]
        lora_state: dict[str, torch.Tensor] = {}
        model = self.model
        if isinstance(model, PeftModel):
            lora_state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
            rows = self._trained_rows(model)
            model = model.unload()  # the base model without adapters (not merged)
            for module_name, (ids, values) in rows.items():
                model.get_submodule(module_name).weight.data[ids] = values
        size = len(self.tokenizer)
        if model.get_input_embeddings().weight.shape[0] < size:
            model.resize_token_embeddings(size, mean_resizing=True)
        self._new_token_ids.extend(new_ids)
        if self.lora["enabled"]:
            model = self._wrap_lora(model)
            if lora_state:
                unexpected = model.load_state_dict(lora_state, strict=False).unexpected_keys
                if unexpected:
                    raise RuntimeError(f"LoRA weights could not be carried over: {unexpected[:3]}")
        self.model = model
        return added

    @staticmethod
    def _trained_rows(model: Any) -> dict[str, tuple[list[int], torch.Tensor]]:
        """Current values of the trainable-token rows of a PEFT model, by module name in the base model."""
        from peft.utils.other import TrainableTokensWrapper

        out = {}
        base = model.get_base_model()
        for name, module in base.named_modules():
            if isinstance(module, TrainableTokensWrapper):
                layer = module.token_adapter
                for adapter in layer.active_adapters:
                    ids = list(layer.token_indices[adapter])
                    out[name] = (ids, layer.trainable_tokens_delta[adapter].detach().clone())
        return out

    # -- inputs -------------------------------------------------------------------------------
    def _query_text(self, text: str) -> str:
        if not text.strip():
            raise DataError("empty text input: every caption and query must contain words; fix or drop it")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_text_tokens:
            text = self.tokenizer.decode(ids[: self.max_text_tokens])
        return text

    def _image_token(self) -> str:
        token = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        if not token:
            raise ConfigError(
                f"the processor of {self.path!r} has neither a chat template nor an image token; "
                "cannot place an image in the prompt"
            )
        return token

    def prompt_text(self, content: Content) -> str:
        """The prompt string for one query (before the processor expands image placeholders)."""
        if content.modality not in ("text", "image"):
            raise unreadable_modality(self.name, content)
        query = self._query_text(content.value) if content.modality == "text" else None
        if getattr(self.processor, "chat_template", None):
            items: list[dict[str, str]] = []
            if query is not None:
                items.append({"type": "text", "text": self._prompt_head + query + self._prompt_tail})
            else:
                if self._prompt_head:
                    items.append({"type": "text", "text": self._prompt_head})
                items.append({"type": "image"})
                if self._prompt_tail:
                    items.append({"type": "text", "text": self._prompt_tail})
            messages = [{"role": "user", "content": items}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._prompt_head + (query if query is not None else self._image_token()) + self._prompt_tail

    def _load_image(self, path: str):
        from PIL import Image

        from gcr.data.karpathy import load_image  # DataError naming a missing/corrupt file

        image = load_image(path)
        if self.image_size is not None and image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return image

    def batch(
        self, contents: Sequence[Content], targets: Sequence[Sequence[int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Left-padded prompts (+ targets and ``labels``), with the processor's image inputs.

        The processor tokenizes the prompts and expands image placeholders (never truncating); padding is then
        removed, the targets appended and the rows left-padded again. Tensors the processor aligns with
        ``input_ids`` (``token_type_ids``, ``mm_token_type_ids``) are extended with 0 (text) over the targets.
        """
        if not contents:
            raise ValueError("batch() needs at least one content")
        modalities = {c.modality for c in contents}
        if not modalities <= {"image", "text"}:
            raise ValueError(f"unknown content modality in {sorted(modalities)}; expected image or text")
        if targets is not None and len(targets) != len(contents):
            raise ValueError(f"{len(contents)} contents but {len(targets)} targets")
        # Training batches mix image and text inputs (indexing + retrieval examples); the processor matches
        # the images, in order, to the image placeholders of the prompts that have one.
        is_image = "image" in modalities
        prompts = [self.prompt_text(c) for c in contents]
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):
            kwargs["add_special_tokens"] = (
                False  # the chat template wrote BOS already (as HF's processor does)
            )
        images = [self._load_image(c.value) for c in contents if c.modality == "image"] if is_image else None
        encoded = self.processor(text=prompts, images=images, **kwargs)
        input_ids = encoded["input_ids"]
        mask = encoded.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        aligned = [k for k, v in encoded.items() if k not in ("input_ids", "attention_mask")
                   and isinstance(v, torch.Tensor) and v.shape == input_ids.shape]  # fmt: skip

        n = len(contents)
        rows = [input_ids[i][mask[i]].tolist() for i in range(n)]
        lengths = [len(r) + (len(targets[i]) if targets is not None else 0) for i, r in enumerate(rows)]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        out_ids = torch.full((n, width), pad, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        extra = {k: torch.zeros((n, width), dtype=encoded[k].dtype) for k in aligned}
        for i, row in enumerate(rows):
            target = list(targets[i]) if targets is not None else []
            start = width - lengths[i]
            out_ids[i, start:] = torch.tensor(row + target, dtype=torch.long)
            attention[i, start:] = 1
            if target:
                labels[i, width - len(target) :] = torch.tensor(target, dtype=torch.long)
            for k in aligned:
                extra[k][i, start : start + len(row)] = encoded[k][i][mask[i]]
        out: dict[str, torch.Tensor] = {"input_ids": out_ids, "attention_mask": attention, **extra}
        if not (self._mrope and is_image):
            # as generate() computes them; multimodal-RoPE models derive image prompts' 3D positions themselves
            out["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
        if targets is not None:
            out["labels"] = labels
        dtype = _unwrap(self.model).dtype
        for k, v in encoded.items():
            if (
                k in out
                or k in aligned
                or k in ("input_ids", "attention_mask")
                or not isinstance(v, torch.Tensor)
            ):
                continue
            out[k] = v.to(dtype) if v.is_floating_point() else v
        return out

    # -- model calls --------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._reset_rope_cache()
        return self.model(**batch).loss

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._reset_rope_cache()
        return super().logits(batch)

    @torch.no_grad()
    def generate(self, batch, *, logits_processor, num_beams, max_new_tokens, **kwargs):
        """The base class's ``generate()`` (image inputs pass through to HF), after clearing cached RoPE deltas."""
        self._reset_rope_cache()
        return super().generate(
            batch,
            logits_processor=logits_processor,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )

    @torch.no_grad()
    def generate_text(self, batch, **kwargs) -> list[str]:
        """Unconstrained decoding (captions), after clearing cached RoPE deltas like :meth:`generate`."""
        self._reset_rope_cache()
        return super().generate_text(batch, **kwargs)

    def _reset_rope_cache(self) -> None:
        """Drop multimodal-RoPE deltas a previous call cached (Qwen2-VL keeps them on the module)."""
        if self._mrope:
            for m in (_unwrap(self.model), getattr(_unwrap(self.model), "model", None)):
                if m is not None and getattr(m, "rope_deltas", None) is not None:
                    m.rope_deltas = None

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Processor, adapter (or the full model without LoRA) and ``backbone.json``, all safetensors."""
        from peft import PeftModel

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, PeftModel):
            # new rows are saved as trainable tokens: no need to copy whole embedding matrices
            self.model.save_pretrained(directory, save_embedding_layers=False, safe_serialization=True)
        else:
            # a stale adapter here would make transformers load it on top of the full model
            for stale in ("adapter_config.json", ADAPTER_WEIGHTS):
                (directory / stale).unlink(missing_ok=True)
            self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        options = {"name": self.name, **self.options(), "new_token_ids": self._new_token_ids}
        (directory / BACKBONE_FILE).write_text(json.dumps(options, indent=2))
        return directory

    def options(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "lora": dict(self.lora),
            "dtype": self.dtype,
            "max_text_tokens": self.max_text_tokens,
            "prompt": self.prompt,
            "image_size": self.image_size,
            "trust_remote_code": self.trust_remote_code,
        }


def _split_prompt(prompt: str) -> tuple[str, str]:
    if not isinstance(prompt, str) or prompt.count("{query}") != 1:
        raise ConfigError(f"model.prompt must contain '{{query}}' exactly once, got {prompt!r}")
    head, tail = prompt.split("{query}")
    return head, tail
