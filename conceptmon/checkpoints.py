"""Find per-epoch checkpoints, read their epoch numbers, and load their weights safely.

Checkpoints are pickles: they are loaded with ``weights_only=True`` unless the user
passes ``--trust-checkpoints`` for a file that pickles a whole module.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConceptmonError

EXTENSIONS = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


class CheckpointError(ConceptmonError):
    """A checkpoint folder or file that cannot be used."""


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    epoch: int


_INT = re.compile(r"\d+")


def epoch_from_name(path: Path) -> int | None:
    """The last integer in the file name (``epoch=12-step=300.ckpt`` -> 300 is avoided by the
    ``epoch`` entry inside Lightning files; plain names like ``ckpt_e12.pt`` give 12)."""
    found = _INT.findall(Path(path).stem)
    return int(found[-1]) if found else None


def _read_raw(path: Path, trust: bool, mmap: bool = False):
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not trust and "weights_only" in str(e):
            raise CheckpointError(
                f"{path}: holds pickled Python objects (a whole model?), which weights_only loading "
                f"refuses; re-save it as a state_dict, or pass --trust-checkpoints if you trust its source"
            ) from None
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        if mmap:  # legacy (non-zip) files cannot be memory-mapped: try once more plainly
            return _read_raw(path, trust, mmap=False)
        msg = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({msg})") from None


def _safetensors_epoch(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    value = meta.get("epoch")
    return int(value) if value is not None and str(value).lstrip("-").isdigit() else None


def read_epoch(path: Path, trust: bool = False) -> int:
    """The ``epoch`` entry stored in the checkpoint, else the last integer of its name."""
    path = Path(path)
    epoch = None
    if path.suffix == ".safetensors":
        epoch = _safetensors_epoch(path)
    else:
        raw = _read_raw(path, trust, mmap=True)  # memory-mapped: reading one int stays cheap
        if isinstance(raw, dict) and "epoch" in raw:
            value = raw["epoch"]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                epoch = int(value)
        del raw
    if epoch is None:
        epoch = epoch_from_name(path)
    if epoch is None:
        raise CheckpointError(
            f"{path}: no epoch: the file has no 'epoch' entry and its name has no number "
            f"(name files like epoch_0005.pt)"
        )
    return epoch


def checkpoint_files(folder: str | Path) -> list[Path]:
    """Candidate files in ``folder`` (not recursive); hidden and temporary files are ignored."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (--ckpts takes the folder of per-epoch checkpoints)")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix in EXTENSIONS and not p.name.startswith(".")
    )


def by_epoch(folder: Path, found: list[tuple[Path, int]]) -> list[CheckpointFile]:
    """Sorted by epoch; two files with one epoch are an error naming both."""
    seen: dict[int, Path] = {}
    for path, epoch in found:
        if epoch in seen:
            raise CheckpointError(f"{folder}: two checkpoints for epoch {epoch}: {seen[epoch].name} and {path.name}")
        seen[epoch] = path
    return [CheckpointFile(seen[e], e) for e in sorted(seen)]


def find_checkpoints(folder: str | Path, trust: bool = False) -> list[CheckpointFile]:
    """Checkpoints in ``folder``, sorted by epoch; any unreadable file is an error."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder}: no checkpoints (expected files ending in {', '.join(EXTENSIONS)})"
        )
    return by_epoch(folder, [(p, read_epoch(p, trust)) for p in files])


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(raw, path: Path) -> dict[str, torch.Tensor]:
    """The model weights inside whatever the training script saved."""
    if isinstance(raw, torch.nn.Module):
        return raw.state_dict()
    if isinstance(raw, dict):
        for key in STATE_DICT_KEYS:
            inner = raw.get(key)
            if isinstance(inner, torch.nn.Module):
                return inner.state_dict()
            if _is_tensor_dict(inner):
                return inner
        tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(raw) - 2:  # a plain state_dict, maybe with an epoch entry
            return tensors
    raise CheckpointError(
        f"{path}: no weights found (expected a state_dict, or a dict holding one under "
        f"{', '.join(repr(k) for k in STATE_DICT_KEYS)})"
    )


def load_state_dict(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    return extract_state_dict(_read_raw(path, trust), Path(path))


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def fit_keys(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip ``module.``/``model.``/``_orig_mod.`` prefixes when that makes the keys fit."""
    best, best_hits = sd, len(expected & set(sd))
    frontier = [sd]
    for _ in range(len(STRIP_PREFIXES)):  # prefixes can stack: model._orig_mod.module.x
        nxt = []
        for cand in frontier:
            for prefix in STRIP_PREFIXES:
                if any(k.startswith(prefix) for k in cand):
                    stripped = _strip(cand, prefix)
                    hits = len(expected & set(stripped))
                    if hits > best_hits:
                        best, best_hits = stripped, hits
                    nxt.append(stripped)
        frontier = nxt
    return best


def _sample(keys, n=3) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def apply_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``sd`` into ``model`` strictly; a mismatch names the missing and unexpected keys."""
    expected = set(model.state_dict())
    sd = fit_keys(sd, expected)
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_sample(unexpected)}")
        raise CheckpointError(
            f"{path}: weights do not fit model (is model.arch/kwargs right?): {'; '.join(parts)}"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"{path}: weights do not fit model (is model.kwargs right?): {detail}") from None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
