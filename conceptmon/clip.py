"""CLIP through Hugging Face transformers: offline-first loading and normalised features.

``load_clip`` never touches the network unless ``CONCEPTMON_ALLOW_DOWNLOAD=1``: the model
must be a local folder or already in the Hugging Face cache. Both encoders return
L2-normalised float32 features on the CPU (they are cached and compared, not trained).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from .errors import ConceptmonError

ALLOW_DOWNLOAD_ENV = "CONCEPTMON_ALLOW_DOWNLOAD"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class ClipModelError(ConceptmonError):
    """A CLIP model that is not available offline or cannot be loaded."""


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") == "1"


def _missing_message(name: str, field: str) -> str:
    if downloads_allowed():
        return (
            f"{field}: CLIP model {name!r} could not be downloaded (no network, or no such model?) "
            f"and is not in the Hugging Face cache; set {field} to a local folder"
        )
    return (
        f"{field}: CLIP model {name!r} is neither a local folder nor in the Hugging Face cache; "
        f"on a machine with internet run `hf download {name}` (older hubs: `huggingface-cli download {name}`) "
        f"and copy the cache (or save_pretrained folder) here, set {field} to a local folder, "
        f"or set {ALLOW_DOWNLOAD_ENV}=1 to let conceptmon download it"
    )


def _looks_like_path(name: str) -> bool:
    """Hub names are ``org/name``; anything else with a path shape is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_clip(name_or_path: str, device, *, field: str = "detector.clip_model"):
    """(model, processor) for a Hugging Face CLIP checkpoint name or a local folder.

    ``field`` names the config field in error messages (the embedding's ``clip:`` encoder
    passes ``embedding.encoder``). The model is in eval mode on ``device``.
    """
    from transformers import AutoProcessor, CLIPModel

    local = Path(name_or_path).expanduser()
    source = str(local) if local.is_dir() else name_or_path
    if not local.is_dir() and _looks_like_path(name_or_path):
        raise ClipModelError(
            f"{field}: {name_or_path} is not a folder (expected a CLIP save_pretrained folder "
            f"or a Hugging Face name like {DEFAULT_CLIP})"
        )
    offline = not downloads_allowed()
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=offline)
        processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as e:
        if local.is_dir():
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClipModelError(f"{field}: {local} is not a loadable CLIP folder ({first})") from None
        raise ClipModelError(_missing_message(name_or_path, field)) from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ClipModelError(f"{field}: {name_or_path!r} has no CLIP processor (tokenizer + image processor)")
    return model.eval().to(torch.device(device)), processor


def model_fingerprint(name_or_path: str) -> str:
    """Identifies the CLIP weights for cache keys.

    A local folder: the names, sizes and mtimes of its files. A hub name: the name plus the
    cached snapshot's commit when it is in the cache, so an updated download changes the key.
    """
    local = Path(name_or_path).expanduser()
    h = hashlib.sha256()
    if local.is_dir():
        h.update(f"folder:{local.resolve()}\n".encode())
        for p in sorted(local.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    h.update(f"hub:{name_or_path}\n".encode())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(cached, str):
            h.update(Path(cached).parent.name.encode())  # the snapshot folder is the commit hash
    except Exception:  # an unusual hub version only makes the key less specific
        pass
    return h.hexdigest()[:16]


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output with the projection in ``pooler_output``; 4.x a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


@torch.inference_mode()
def encode_texts(model, processor, words: Sequence[str], device, batch_size: int = 256) -> torch.Tensor:
    """(len(words), d) L2-normalised CLIP text features, each word encoded as it is."""
    device = torch.device(device)
    tokenizer = processor.tokenizer
    max_length = getattr(model.config.text_config, "max_position_embeddings", 77)
    parts = []
    for start in range(0, len(words), batch_size):
        batch = list(words[start : start + batch_size])
        tokens = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        parts.append(_normalise(_features(model.get_text_features(**tokens))))
    if not parts:
        return torch.empty(0, model.config.projection_dim)
    return torch.cat(parts)


def preprocess_images(processor, images) -> torch.Tensor:
    """CLIP's own preprocessing (resize, crop, normalise) of PIL images -> (B, 3, H, W)."""
    return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


@torch.inference_mode()
def encode_images(model, processor, images, device) -> torch.Tensor:
    """(B, d) L2-normalised CLIP image features of PIL images, or of pixel values already
    made by :func:`preprocess_images` (what the probe loader's workers produce)."""
    device = torch.device(device)
    pixels = images if isinstance(images, torch.Tensor) else preprocess_images(processor, images)
    pixels = pixels.to(device=device, dtype=next(model.parameters()).dtype)
    return _normalise(_features(model.get_image_features(pixel_values=pixels)))
