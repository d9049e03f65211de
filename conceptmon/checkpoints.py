"""Find per-epoch checkpoints, read their epoch numbers, and load their weights safely.

Checkpoints are pickles: they are loaded with ``weights_only=True`` unless the user
passes ``--trust-checkpoints`` for a file that pickles a whole module.

A checkpoint is a file (``*.pt *.pth *.ckpt *.safetensors *.bin``) or a Hugging Face
folder (``save_pretrained`` output or a Trainer ``checkpoint-N/``). Epoch numbers always
count *completed* epochs (0 = before training):

* Lightning ``.ckpt`` files store the 0-based index of the epoch they were saved in;
  their loop progress says how many epochs had finished (:func:`lightning_epoch`);
* Trainer folders store a fractional ``epoch`` in ``trainer_state.json``, rounded down
  (:func:`epochs_completed`);
* anything else: its ``epoch`` entry, else the last number in its name.
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import pickle
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import ConceptmonError
from .store import sha256_file as file_sha256  # one implementation of the file hash

EXTENSIONS = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")

# Hugging Face layouts (the names transformers' save_pretrained and Trainer write).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HF_TRAINER_STATE = "trainer_state.json"
HF_STEP_FOLDER = "checkpoint-"
"""Trainer folders are named by global step, so their number is never an epoch."""
NOT_WEIGHTS = ("training_args.bin",)
"""Files with a checkpoint extension that never hold model weights (the Trainer's arguments)."""
LIGHTNING_KEY = "pytorch-lightning_version"
SAFE_GLOBALS = (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath)
"""Harmless classes that training scripts pickle beside the weights (Lightning's saved
hyperparameters often hold a ``data_dir`` path): allowed under weights_only loading."""
EPOCH_TOLERANCE = 1e-6
"""Trainer epochs are float sums: 1.9999999 still means two completed epochs."""


class CheckpointError(ConceptmonError):
    """A checkpoint folder or file that cannot be used."""


class UnreadableCheckpoint(CheckpointError):
    """A file or Hugging Face folder that does not read as a checkpoint (yet): truncated,
    half-written, corrupt, or a folder whose weights are not all there. ``watch`` tries it
    again once it has settled; other errors are final for that file until it changes."""


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
            raise UnreadableCheckpoint(f"{path}: unreadable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not trust and "weights_only" in str(e):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = found.group(1) if found else "a whole model?"
            raise CheckpointError(
                f"{path}: holds pickled Python objects ({what}), which weights_only loading "
                f"refuses; re-save it as a state_dict, or pass --trust-checkpoints if you trust its source"
            ) from None
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        if mmap:  # legacy (non-zip) files cannot be memory-mapped: try once more plainly
            return _read_raw(path, trust, mmap=False)
        msg = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise UnreadableCheckpoint(f"{path}: unreadable or truncated checkpoint ({msg})") from None


def _safetensors_epoch(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UnreadableCheckpoint(f"{path}: unreadable safetensors file ({e})") from None
    value = meta.get("epoch")
    return int(value) if value is not None and str(value).lstrip("-").isdigit() else None


def _number(value) -> float | None:
    """A finite number stored in a checkpoint; None for anything else (NaN and infinities too)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def lightning_epoch(raw: dict) -> int | None:
    """Epochs completed when a Lightning checkpoint was written.

    Lightning stores ``epoch`` = the 0-based index of the epoch being run, and under
    ``loops.fit_loop.epoch_progress.current`` how many epochs were *processed* (all
    their training batches done: ``processed`` is counted before ``on_train_epoch_end``,
    where ModelCheckpoint saves, ``completed`` only after it). A file saved at the end
    of the k-th epoch therefore says ``epoch=k-1, processed=k``: conceptmon epoch k.
    Without loop progress (very old files) the file is assumed to be saved at the end
    of its epoch, as ModelCheckpoint does: ``epoch + 1``.
    """
    progress = raw.get("loops", {})
    for key in ("fit_loop", "epoch_progress", "current", "processed"):
        progress = progress.get(key) if isinstance(progress, dict) else None
    processed = _number(progress)
    if processed is not None:
        return int(processed)
    epoch = _number(raw.get("epoch"))
    return int(epoch) + 1 if epoch is not None else None


def epochs_completed(epoch: float) -> int:
    """A Trainer's fractional epoch (2.5 = half-way through the third) as epochs completed: 2."""
    return int(math.floor(float(epoch) + EPOCH_TOLERANCE))


def trainer_state_epoch(folder: Path) -> float | None:
    """The ``epoch`` in a Trainer folder's ``trainer_state.json`` (None when absent)."""
    path = Path(folder) / HF_TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableCheckpoint(f"{path}: unreadable ({e})") from None
    value = state.get("epoch") if isinstance(state, dict) else None
    return float(value) if _number(value) is not None else None


def is_hf_folder(path: Path) -> bool:
    """A folder holding a Hugging Face weight file (save_pretrained or a Trainer checkpoint)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in HF_WEIGHT_FILES)


def _folder_epoch(path: Path) -> int | None:
    value = trainer_state_epoch(path)
    if value is not None:
        return epochs_completed(value)
    if path.name.startswith(HF_STEP_FOLDER):
        raise CheckpointError(
            f"{path}: no {HF_TRAINER_STATE}, and the number in a Trainer folder's name is a step, not an "
            f"epoch; keep the Trainer's {HF_TRAINER_STATE} in it, or rename the folder epoch_N"
        )
    return epoch_from_name(path)


def read_epoch(path: Path, trust: bool = False) -> int:
    """Epochs completed when the checkpoint was saved (see the module docstring)."""
    path = Path(path)
    epoch = None
    if path.is_dir():
        epoch = _folder_epoch(path)
    elif path.suffix == ".safetensors":
        epoch = _safetensors_epoch(path)
    else:
        raw = _read_raw(path, trust, mmap=True)  # memory-mapped: reading one int stays cheap
        if isinstance(raw, dict) and LIGHTNING_KEY in raw:
            epoch = lightning_epoch(raw)
        elif isinstance(raw, dict) and "epoch" in raw:
            value = _number(raw["epoch"])
            if value is not None:
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
    """Candidate checkpoints in ``folder`` (not recursive): files with a checkpoint
    extension and Hugging Face folders. Hidden and temporary entries are ignored, and so
    are the Trainer's own files (``training_args.bin``, and the final ``save_model``
    weights beside ``checkpoint-N/`` folders, which repeat one of them)."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (--ckpts takes the folder of per-epoch checkpoints)")
    entries = [p for p in folder.iterdir() if not p.name.startswith((".", "tmp-"))]
    folders = [p for p in entries if is_hf_folder(p)]
    files = [p for p in entries if p.is_file() and p.suffix in EXTENSIONS and p.name not in NOT_WEIGHTS]
    if folders:
        files = [p for p in files if p.name not in HF_WEIGHT_FILES]
    return sorted(files + folders)


def _epoch_note(path: Path) -> str:
    value = trainer_state_epoch(path) if Path(path).is_dir() else None
    return f" ({HF_TRAINER_STATE} epoch {value:g})" if value is not None else ""


def drop_lightning_last_copies(found: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """Lightning's ``last.ckpt`` (``save_last=True``) repeats the newest epoch's file: keep that file."""
    named = {epoch for path, epoch in found if not _is_last_copy(path)}
    return [(path, epoch) for path, epoch in found if not (_is_last_copy(path) and epoch in named)]


def _is_last_copy(path: Path) -> bool:
    return path.suffix == ".ckpt" and re.fullmatch(r"last(-v\d+)?", path.stem) is not None


def by_epoch(folder: Path, found: list[tuple[Path, int]]) -> list[CheckpointFile]:
    """Sorted by epoch; two checkpoints with one epoch are an error naming both."""
    seen: dict[int, Path] = {}
    for path, epoch in found:
        if epoch in seen:
            first = seen[epoch]
            notes = (_epoch_note(first), _epoch_note(path))
            hint = ("; fractional Trainer epochs count the epochs completed, so save once per epoch "
                    "(save_strategy='epoch')" if any(notes) else "")
            raise CheckpointError(
                f"{folder}: two checkpoints for epoch {epoch}: {first.name}{notes[0]} and {path.name}{notes[1]}{hint}"
            )
        seen[epoch] = path
    return [CheckpointFile(seen[e], e) for e in sorted(seen)]


def find_checkpoints(folder: str | Path, trust: bool = False) -> list[CheckpointFile]:
    """Checkpoints in ``folder``, sorted by epoch; any unreadable file is an error."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder}: no checkpoints (expected files ending in {', '.join(EXTENSIONS)}, "
            f"or Hugging Face folders holding {HF_WEIGHT_FILES[0]} or {HF_WEIGHT_FILES[2]})"
        )
    return by_epoch(folder, drop_lightning_last_copies([(p, read_epoch(p, trust)) for p in files]))


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


def hf_weight_paths(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: the single file, or every shard its index names."""
    folder = Path(folder)
    for name in HF_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UnreadableCheckpoint(f"{path}: unreadable shard index ({e})") from None
        shards = [folder / shard for shard in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise UnreadableCheckpoint(f"{path}: names shards that are missing: {_sample(missing)}")
        return shards
    raise UnreadableCheckpoint(f"{folder}: no weights (expected one of {', '.join(HF_WEIGHT_FILES)})")


def load_state_dict(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file, or of a Hugging Face folder (all shards merged)."""
    path = Path(path)
    if path.is_dir():
        merged: dict[str, torch.Tensor] = {}
        for shard in hf_weight_paths(path):
            merged.update(extract_state_dict(_read_raw(shard, trust), shard))
        return merged
    return extract_state_dict(_read_raw(path, trust), path)


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


BATCH_COUNTER = "num_batches_tracked"


def batch_counters(model: torch.nn.Module) -> set[str]:
    """State keys of the BatchNorm step counters (used only by momentum=None in training)."""
    return {
        f"{name}.{BATCH_COUNTER}" if name else BATCH_COUNTER
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.num_batches_tracked is not None
    }


def fill_batch_counters(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """``sd`` with missing BatchNorm step counters set to 0, and the keys filled.

    Older torch versions and some exporters do not save them; torch itself accepts
    their absence only for state dicts without version metadata. They do not change
    what a network computes in eval mode, so a checkpoint without them is still the
    same network.
    """
    missing = sorted(batch_counters(model) - set(sd))
    if not missing:
        return sd, []
    return {**sd, **{key: torch.tensor(0, dtype=torch.long) for key in missing}}, missing


def apply_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Load ``sd`` into ``model`` strictly; a mismatch names the missing and unexpected keys.

    Returns the BatchNorm step counters that were missing and set to 0 (see
    :func:`fill_batch_counters`); every other missing key is an error.
    """
    expected = set(model.state_dict())
    sd = fit_keys(sd, expected)
    sd, filled = fill_batch_counters(model, sd)
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
    return filled


def checkpoint_sha256(path: Path) -> str:
    """Hash of a checkpoint file, or of a Hugging Face folder's weight files (not its optimizer state)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for weights in hf_weight_paths(path):
        h.update(weights.name.encode())
        h.update(file_sha256(weights).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- transformers models


def is_transformers_model(model: torch.nn.Module) -> bool:
    """A transformers PreTrainedModel (checked without importing transformers for other models)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _pretrained_folder(path: Path, stage: Path, trust: bool) -> Path:
    """``path`` as a folder transformers can read: a Hugging Face folder as is, a file staged as one."""
    if path.is_dir():
        return path
    if path.suffix == ".safetensors":
        (stage / HF_WEIGHT_FILES[0]).symlink_to(path.resolve())
    else:  # a .pt/.bin/.ckpt of any layout: our safe reader finds the weights first
        torch.save(load_state_dict(path, trust), stage / HF_WEIGHT_FILES[2])
    return stage


def pretrained_state_dict(model: torch.nn.Module, path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The weights at ``path`` read by transformers' own ``from_pretrained`` for ``type(model)``.

    transformers renames legacy parameter names on load (a ViT saved as
    ``encoder.layer.0.attention.attention.query`` loads into ``layers.0.attention.q_proj``),
    so a folder saved by any transformers version fits the model built today. Weights the
    file lacks or that have another shape are refused, as for any checkpoint.
    """
    from .models import quiet_transformers

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="conceptmon-hf-") as stage, quiet_transformers():
        source = _pretrained_folder(path, Path(stage), trust)
        try:
            loaded, info = type(model).from_pretrained(
                str(source), config=model.config, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{path}: transformers cannot load it ({str(e).splitlines()[0]})") from None
    problems = []
    if info.get("mismatched_keys"):
        shapes = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info["mismatched_keys"])
        problems.append(f"other shapes for {_sample(shapes)}")
    missing = set(info.get("missing_keys") or ()) - batch_counters(loaded)
    if missing:
        problems.append(f"missing keys {_sample(missing)}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys {_sample(info['unexpected_keys'])}")
    if problems:
        raise CheckpointError(
            f"{path}: weights do not fit model (is model.arch/kwargs right?): {'; '.join(problems)}"
        )
    return loaded.state_dict()


class WeightLoader:
    """Loads checkpoint after checkpoint into one model, and says what it had to fill in once per run.

    transformers models read their weights through ``from_pretrained`` (legacy names are
    renamed); every other model through :func:`load_state_dict` + :func:`apply_state_dict`.
    """

    def __init__(self, model: torch.nn.Module, log: Callable[[str], None] = print):
        self.model = model
        self.log = log
        self._noticed = False

    def load(self, path: Path, trust: bool = False, model: torch.nn.Module | None = None) -> None:
        """Load ``path`` into ``model`` (default: the loader's model; a copy of it for passes
        that hold several checkpoints at once)."""
        path = Path(path)
        model = self.model if model is None else model
        if is_transformers_model(model):
            state = pretrained_state_dict(model, path, trust)
        else:
            state = load_state_dict(path, trust)
        filled = apply_state_dict(model, state, path)
        del state
        if filled and not self._noticed:
            self._noticed = True
            self.log(
                f"notice: {path.name}: no {BATCH_COUNTER} for {len(filled)} BatchNorm layer(s) "
                f"(older torch or a filtered state_dict); set to 0, which changes no eval output "
                f"(said once per run)"
            )
