"""The dissection engine: checkpoints -> one forward pass per batch -> per-epoch Parquet.

``dissect_run`` is what ``conceptmon dissect`` calls; ``dissect_model`` labels the
neurons of one in-memory model and is what the training-loop API builds on.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from . import __version__, store
from .checkpoints import CheckpointError, CheckpointFile, WeightLoader, checkpoint_sha256, find_checkpoints
from .config import Config, ConfigError, LayerSpec, resolve_out, run_name
from .detectors import Detector, LayerScores, MapExtrema, RunContext, TrustSettings, create_detector, rank_concepts
from .devices import available_bytes, resolve_device
from .errors import ConceptmonError
from .hooks import LayerTrace, resolve_layers
from .layouts import ResolvedLayout, canonical, resolve_layout
from .models import ModelError, build_model
from .probes import ProbeError, ProbeSet, create_probe

TOP_IMAGES_PER_NEURON = 10


class ActivationError(ConceptmonError):
    """A layer produced NaN or infinite activations."""


# ----------------------------------------------------------------------------- streaming top images


class TopImages:
    """Running top-k probe images per unit by maximum activation (O(units * k) memory)."""

    def __init__(self, k: int = TOP_IMAGES_PER_NEURON):
        self.k = k
        self.values: torch.Tensor | None = None  # (U, k)
        self.index: torch.Tensor | None = None

    def add(self, per_image: torch.Tensor, index: torch.Tensor) -> None:
        """per_image: (B, U) one value per image and unit. Ties go to the lower probe index,
        so the result does not depend on the order images come in."""
        vals = per_image.t()
        idx = index.to(vals.device)[None, :].expand_as(vals)
        if self.values is not None and self.values.shape[1] >= self.k:
            # only images at or above some unit's k-th value can enter (>=: a tie may win on index)
            entering = (vals >= self.values[:, -1:]).any(dim=0)
            if not bool(entering.any()):
                return
            vals, idx = vals[:, entering], idx[:, entering]
        if self.values is not None:
            vals = torch.cat([self.values, vals], dim=1)
            idx = torch.cat([self.index, idx], dim=1)
        by_index = torch.argsort(idx, dim=1, stable=True)
        vals, idx = torch.gather(vals, 1, by_index), torch.gather(idx, 1, by_index)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values, self.index = torch.gather(vals, 1, order), torch.gather(idx, 1, order)


# ----------------------------------------------------------------------------- probe images


class ImageDataset(torch.utils.data.Dataset):
    """Probe images as uint8 (3, H, W) tensors with their index.

    Normalisation happens batch-wise on the device (:func:`normalize`): a quarter of
    the host-to-device traffic, and no per-image float work in the loader.
    """

    def __init__(self, probe: ProbeSet, image_size: int | None):
        self.probe = probe
        self.image_size = image_size
        # Without a target size every image must match the first, or batches cannot form.
        self.stored_size = probe.load_image(0).size if image_size is None and len(probe) else None

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int):
        img = self.probe.load_image(i)
        if self.image_size is not None and img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        elif self.image_size is None and img.size != self.stored_size:
            w, h = self.stored_size
            raise ProbeError(
                f"{self.probe.relpath(i)}: image is {img.size[0]}x{img.size[1]}, the first is {w}x{h}; "
                f"set probe.image_size to resize all probe images to one size"
            )
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), i


def normalize(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return batch.float().div_(255.0).sub_(mean).div_(std)


# ----------------------------------------------------------------------------- one pass, many models


@dataclass
class LayerResult:
    labels: LayerScores  # (U, M) scores, dead units, confidence
    top_values: torch.Tensor  # (U, k) activations of the top images
    top_index: torch.Tensor  # (U, k) probe indices

    @property
    def scores(self) -> torch.Tensor:
        return self.labels.scores


READ_ORDER_SEED = 0
"""The probe's fixed random read order (:func:`make_loader` ``shuffled``): the same on every run."""


def make_loader(probe: ProbeSet, cfg: Config, device: torch.device, shuffled: bool = False):
    """Batches of (uint8 images, probe indices); ``shuffled``: in one fixed random order
    (``READ_ORDER_SEED``) rather than the probe's, for detectors whose running estimates
    assume no order (Broden lists its images by source data set)."""
    dataset = ImageDataset(probe, cfg.probe.image_size)
    order = None
    if shuffled:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(READ_ORDER_SEED)).tolist()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=order,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def worker_error(error: Exception) -> Exception:
    """The one-line error a DataLoader worker raised, without the worker's traceback.

    DataLoader re-raises a worker's exception as the same type with a message holding
    "Caught X in DataLoader worker process N" and the whole traceback; the original
    message is its last line (after ``module.X: ``).
    """
    text = str(error)
    if "DataLoader worker process" not in text:
        return error
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    name = type(error).__name__
    marker = f"{name}: "
    message = last.split(marker, 1)[1] if marker in last else last
    try:
        return type(error)(message)
    except Exception:  # an exception type that does not take one message
        return ConceptmonError(message)


def _batches(loader):
    """The loader's batches; a worker's expected error comes back as its own one line.

    Worker processes are shut down as soon as the pass ends, however it ends: left to the
    garbage collector, they would be joined (with a timeout) at some later moment.
    """
    iterator = iter(loader)
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except ConceptmonError as e:
                raise worker_error(e) from None
            yield batch
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def layer_shapes(model: torch.nn.Module, layers: list[str], image_hw: tuple[int, int],
                 device: torch.device) -> dict[str, tuple[int, ...]]:
    """Output shapes of ``layers`` for a batch of two blank images (checked before any work)."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(2, 3, *image_hw, device=device)
        with torch.no_grad(), LayerTrace(model, layers) as trace:
            outputs = trace.run(x)
    except ConceptmonError:
        raise
    except Exception as e:  # the architecture cannot take these images at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"model: a forward pass on {image_hw[0]}x{image_hw[1]} probe images failed ({first}); "
                         f"check probe.image_size and model.kwargs") from None
    finally:
        model.train(was_training)
    return {name: tuple(out.shape) for name, out in outputs.items()}


def resolve_layouts(model, specs: list[LayerSpec], image_hw: tuple[int, int], device) -> dict[str, ResolvedLayout]:
    modules = resolve_layers(model, [s.name for s in specs])
    shapes = layer_shapes(model, [s.name for s in specs], image_hw, device)
    return {s.name: resolve_layout(s, modules[s.name], shapes[s.name], image_hw) for s in specs}


def collect_passes(
    models: list[torch.nn.Module],
    layers: list[str],
    loader,
    detector: Detector,
    device: torch.device,
    *,
    layouts: dict[str, ResolvedLayout] | None = None,
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
) -> list[dict[str, LayerResult]]:
    """One pass over the probe set for several models: each batch is decoded and normalised
    once, then every model's forward pass feeds its own per-layer accumulators. Where an
    accumulator then asks for another pass (``needs_another_pass``: Network Dissection's
    speculative cut failed for some units), the probe is read again for that model and only
    the accumulators that asked are fed."""
    layers = [str(layer) for layer in layers]
    for model in models:
        model.eval().to(device)
    class_token = bool(getattr(detector, "wants_class_token", False))
    accs = [dict() for _ in models]
    tops = [{name: TopImages() for name in layers} for _ in models]
    total = len(loader.dataset)
    layouts = {} if layouts is None else layouts
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        traces = [stack.enter_context(LayerTrace(model, layers)) for model in models]
        wanting = {m: set(layers) for m in range(len(models))}  # the accumulators fed in this pass
        first = True
        while wanting:  # the first pass feeds all; a later one only those that ask for another
            done = 0
            for x, index in _batches(loader):
                x = normalize(x.to(device, non_blocking=True), mean, std)
                for m, names in wanting.items():
                    with torch.autocast(device.type, enabled=amp):
                        outputs = traces[m].run(x)
                    for name in layers:
                        if name not in names:
                            continue
                        raw = outputs[name]
                        if name not in layouts:
                            layouts[name] = resolve_layout(LayerSpec(name), traces[m].modules[name], tuple(raw.shape),
                                                           tuple(x.shape[2:]))
                        act = canonical(raw, layouts[name], class_token).float()
                        extrema = MapExtrema.of(act)  # one reduction each, shared with the accumulator
                        if not bool(torch.isfinite(extrema.map_max).all() & torch.isfinite(extrema.unit_min).all()):
                            raise ActivationError(
                                f"layer {name}: NaN or infinite activations (images {int(index[0])}..{int(index[-1])}); "
                                f"is the checkpoint diverged?"
                            )
                        if name not in accs[m]:
                            accs[m][name] = detector.accumulator(name, act.shape[1])
                        accs[m][name].add_with_extrema(act, index, extrema)
                        if first:
                            tops[m][name].add(extrema.map_max, index)
                done += x.shape[0]
                if progress and first:
                    progress(done, total)
            first = False
            asked = {m: {name for name in names if accs[m][name].needs_another_pass()} for m, names in wanting.items()}
            wanting = {m: names for m, names in asked.items() if names}
    return [
        {name: LayerResult(LayerScores.of(acc[name].scores()), top[name].values, top[name].index) for name in layers}
        for acc, top in zip(accs, tops)
    ]


def collect_layers(model: torch.nn.Module, layers: list[str], loader, detector: Detector, device: torch.device,
                   **kwargs) -> dict[str, LayerResult]:
    """One model's pass (see :func:`collect_passes`)."""
    return collect_passes([model], layers, loader, detector, device, **kwargs)[0]


def _unit_column(value: torch.Tensor | None, n_units: int, fill: float) -> np.ndarray:
    """A per-unit float32 column from an optional (U,) tensor (``fill`` when absent)."""
    if value is None:
        return np.full(n_units, fill, dtype=np.float32)
    return value.detach().float().cpu().numpy().astype(np.float32).reshape(n_units)


def label_rows(labels: LayerScores, names: np.ndarray, cats: np.ndarray, threshold: float, top_k: int) -> dict:
    """The DISSECT columns of one layer (without run, epoch, layer, detector).

    Live units get ``top_k`` rows ranked by :func:`rank_concepts`; a dead unit gets one
    rank-0 row with no concept, score 0, not interpretable and confidence 0.
    """
    scores = labels.scores.float().cpu()
    n_units, n_concepts = scores.shape
    k = min(top_k, n_concepts)
    vals, idx = (t.numpy() for t in rank_concepts(scores, k))
    dead = (labels.dead.cpu().numpy().astype(bool).reshape(n_units) if labels.dead is not None
            else np.zeros(n_units, dtype=bool))
    if labels.interpretable is not None:
        interpretable = labels.interpretable.cpu().numpy().astype(bool).reshape(n_units)
    else:
        interpretable = vals[:, 0] >= threshold
    interpretable = interpretable & ~dead
    confidence = np.where(dead, 0.0, _unit_column(labels.confidence, n_units, np.nan)).astype(np.float32)
    low = np.where(dead, 0.0, _unit_column(labels.score_low, n_units, np.nan)).astype(np.float32)
    high = np.where(dead, 0.0, _unit_column(labels.score_high, n_units, np.nan)).astype(np.float32)
    rows_per_unit = np.where(dead, 1, k)
    unit = np.repeat(np.arange(n_units, dtype=np.int32), rows_per_unit)
    rank = (np.arange(len(unit)) - np.repeat(np.cumsum(rows_per_unit) - rows_per_unit, rows_per_unit)).astype(np.int16)
    live_row = ~dead[unit]
    concept_idx = idx[unit, rank]
    score = np.where(live_row, vals[unit, rank], 0.0).astype(np.float32)
    return {
        "neuron": unit,
        "rank": rank,
        "concept": np.where(live_row, names[concept_idx], None),
        "category": np.where(live_row, cats[concept_idx], None),
        "score": score,
        "distance": (-score).astype(np.float32),
        "interpretable": interpretable[unit],
        "dead": dead[unit],
        "confidence": confidence[unit],
        "score_low": low[unit],
        "score_high": high[unit],
    }


def result_tables(
    results: dict[str, LayerResult], detector: Detector, probe: ProbeSet, *, run: str, epoch: int, top_k: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The DISSECT and TOP_IMAGES rows for one epoch, built column-wise (no per-row Python)."""
    names = np.asarray(detector.concepts.names, dtype=object)
    cats = np.asarray(detector.concepts.categories, dtype=object)
    relpaths = None
    dissect_parts, image_parts = [], []
    for layer, res in results.items():
        columns = label_rows(res.labels, names, cats, detector.threshold, top_k)
        n_units = res.labels.scores.shape[0]
        dissect_parts.append(
            pd.DataFrame({"run": run, "epoch": np.int32(epoch), "layer": layer, **columns, "detector": detector.name})
        )
        tv, ti = res.top_values.float().cpu().numpy(), res.top_index.cpu().numpy()
        if relpaths is None:
            relpaths = np.asarray([probe.relpath(i) for i in range(len(probe))], dtype=object)
        n_top = tv.shape[1]
        image_parts.append(
            pd.DataFrame(
                {
                    "epoch": np.int32(epoch),
                    "layer": layer,
                    "neuron": np.repeat(np.arange(n_units, dtype=np.int32), n_top),
                    "rank": np.tile(np.arange(n_top, dtype=np.int16), n_units),
                    "image": relpaths[ti.reshape(-1)],
                    "activation": tv.reshape(-1).astype(np.float32),
                }
            )
        )
    return pd.concat(dissect_parts, ignore_index=True), pd.concat(image_parts, ignore_index=True)


# ----------------------------------------------------------------------------- a run

ENGINE_VERSION = 3
"""Bumped when the engine's results change for the same inputs (2: layouts, tie rule,
dead units, confidence; 3: top images tied in activation ordered by probe index):
part of every epoch's fingerprint."""
MAX_EPOCH = 2**31 - 1
"""Epoch numbers are int32 in every table."""
AUTO_MAX_CHECKPOINTS_PER_PASS = 8


def results_settings(cfg: Config, probe: ProbeSet, detector: Detector,
                     layouts: dict[str, ResolvedLayout]) -> dict:
    """Everything that changes dissection results, and nothing else (not the device,
    batch size, workers, paths or run name): hashed into the fingerprint that decides
    whether an epoch is already done, and shown when a changed config is refused."""
    return {
        "engine": ENGINE_VERSION,
        "model": {"arch": cfg.model.arch, "kwargs": cfg.model.kwargs},
        "layers": {name: resolved.describe() for name, resolved in layouts.items()},
        "probe": {"name": probe.name, "fingerprint": probe.fingerprint(), "n_images": len(probe),
                  "image_size": cfg.probe.image_size, "mean": list(cfg.probe.mean), "std": list(cfg.probe.std)},
        "detector": detector.settings(),
        "concepts": detector.concepts.fingerprint(),
        "trust": {"replicates": cfg.trust.replicates, "seed": cfg.trust.seed},
        "top_k": cfg.top_k,
        "amp": bool(cfg.amp),
    }


def fingerprint_of(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _settings_diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            diffs += _settings_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return diffs
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def versions() -> dict:
    import torchvision

    return {
        "conceptmon": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def select_checkpoints(
    files: list[CheckpointFile], epochs: list[int] | None, shard: tuple[int, int] | None
) -> list[CheckpointFile]:
    for f in files:
        if not 0 <= f.epoch <= MAX_EPOCH:
            raise CheckpointError(f"{f.path}: epoch {f.epoch} is out of range (0..{MAX_EPOCH})")
    if epochs is not None:
        available = [f.epoch for f in files]
        unknown = sorted(set(epochs) - set(available))
        if unknown:
            raise CheckpointError(f"--epochs: no checkpoint for epochs {unknown}; available: {available}")
        files = [f for f in files if f.epoch in set(epochs)]
    if shard is not None:
        i, n = shard
        files = files[i::n]
    return files


def resolve_ckpt_dir(cfg: Config, ckpts: str | Path | None) -> Path:
    if ckpts:
        return Path(ckpts)
    if cfg.checkpoints:
        return Path(cfg.checkpoints)
    raise ConfigError("no checkpoint folder: pass --ckpts DIR or set checkpoints: in the config")


def probe_image_size(probe: ProbeSet, image_size: int | None) -> tuple[int, int]:
    if image_size is not None:
        return image_size, image_size
    if not len(probe):
        raise ProbeError(f"probe {probe.name!r}: holds no images")
    w, h = probe.load_image(0).size
    return h, w


class Dissector:
    """What stays fixed across the checkpoints of one run, checked and prepared once.

    Everything that can be checked is checked in the constructor, before any forward
    pass or output: the architecture, the layer names and their output layouts (one
    forward pass of two blank images), the probe set, the detector and the output
    folder's previous results.
    """

    def __init__(
        self,
        cfg: Config,
        out: str | Path | None = None,
        *,
        checkpoints: str | Path | None = None,
        force: bool = False,
        model: torch.nn.Module | None = None,
        log: Callable[[str], None] = print,
        checkpoints_per_pass: int | None = None,
    ):
        self.cfg = cfg
        self.out = resolve_out(cfg, str(out) if out else None)
        self.log = log
        self.force = force
        self.live = model is not None
        # specs and hf: folders are also looked up beside the config file
        self.model = model if model is not None else build_model(cfg.model, config_path=cfg.source)
        self.layers = [str(layer) for layer in cfg.layers]
        resolve_layers(self.model, self.layers)
        if model is not None:  # a live training model stays where it is
            param = next(model.parameters(), None)
            self.device = param.device if param is not None else resolve_device(cfg.device)
        else:
            self.device = resolve_device(cfg.device)
        if checkpoints_per_pass is not None and checkpoints_per_pass < 1:
            raise ConfigError(f"--checkpoints-per-pass: must be at least 1, got {checkpoints_per_pass}")
        self.checkpoints_per_pass = checkpoints_per_pass
        self.probe = create_probe(cfg.probe)
        cache = store.resolve_cache_dir(cfg.cache_dir)
        self.ctx = RunContext(
            device=self.device, cache_dir=cache, batch_size=cfg.batch_size, num_workers=cfg.num_workers, log=log,
            trust=TrustSettings(cfg.trust.replicates, cfg.trust.seed),
        )
        self.detector = create_detector(cfg, self.probe, self.ctx)
        self.image_hw = probe_image_size(self.probe, cfg.probe.image_size)
        if not self.live:
            self.model.to(self.device)
        self.layouts = resolve_layouts(self.model, list(cfg.layers), self.image_hw, self.device)
        self.settings = results_settings(cfg, self.probe, self.detector, self.layouts)
        self.fingerprint = fingerprint_of(self.settings)
        self.checkpoints = str(Path(checkpoints).resolve()) if checkpoints else "(in memory)"
        self.weights = WeightLoader(self.model, log)  # [h3] transformers models load via from_pretrained
        self._loader = None

    # ------------------------------------------------------------------------- the folder

    def check_folder(self, epochs: list[int]) -> None:
        """Refuse to mix results: the folder's finished epochs made with another config must
        all be redone in this call (``--force`` covering them), else use another --out."""
        records = store.read_epoch_records(self.out)
        other = sorted(e for e, r in records.items() if r.get("config_fingerprint") != self.fingerprint)
        if not other:
            return
        old = {}
        path = self.out / store.MANIFEST
        if path.exists():
            old = (store.read_json(path) or {}).get("settings") or {}
        diff = "; ".join(_settings_diff(old, self.settings)[:3]) or "settings differ"
        if not self.force:
            raise ConfigError(f"{self.out}: holds results made with another config ({diff}); pass --force to redo "
                              f"them, or use another --out")
        left = sorted(set(other) - set(epochs))
        if left:
            raise ConfigError(f"{self.out}: epochs {left} were made with another config ({diff}) and would stay "
                              f"beside the redone ones; redo every epoch (--force without --epochs/--shard) "
                              f"or use another --out")

    def is_done(self, epoch: int, sha: str) -> bool:
        """True when the epoch's record matches this config and checkpoint, and both of its
        tables still have the bytes the record hashed (a truncated table is redone)."""
        record_path = store.epoch_record_path(self.out, epoch)
        if self.force or not record_path.exists():
            return False
        try:
            record = store.read_json(record_path)
        except store.StoreError:
            return False  # a damaged record is simply redone
        if record.get("config_fingerprint") != self.fingerprint or record.get("sha256") != sha:
            return False
        tables = record.get("tables") or {}
        for name, path in (("dissect", store.dissect_path(self.out, epoch)),
                           ("top_images", store.top_images_path(self.out, epoch))):
            if not path.is_file() or store.sha256_file(path) != tables.get(name):
                self.log(f"epoch {epoch}: {path} does not match its record; redoing the epoch")
                return False
        return True

    def manifest(self) -> dict:
        """The run manifest: config, the fingerprinted settings, concept set, probe, layouts."""
        concepts = self.detector.concepts
        return {
            "run": run_name(self.cfg, self.out),
            "config": self.cfg.to_dict(),
            "config_fingerprint": self.fingerprint,
            "settings": self.settings,
            "detector": self.detector.settings(),
            "concepts": {"names": list(concepts.names), "categories": list(concepts.categories),
                         "fingerprint": concepts.fingerprint(), "source": concepts.source},
            "probe": {"name": self.probe.name, "root": str(Path(self.probe.root).resolve()),
                      "fingerprint": self.probe.fingerprint(), "n_images": len(self.probe)},
            "layers": list(self.layers),
            "layouts": {name: r.describe() for name, r in self.layouts.items()},
            "checkpoints": self.checkpoints,
            "versions": versions(),
        }

    def _prepare(self) -> None:
        """Probe-level work (masks, CLIP features) and the loader: once per Dissector."""
        if self._loader is None:
            self.detector.prepare()
            self._loader = make_loader(self.probe, self.cfg, self.device,
                                       shuffled=self.detector.reads_in_random_order)

    def label(self, models: list[torch.nn.Module], label: str = "pass") -> list[dict[str, LayerResult]]:
        """Each model's per-layer results from one pass over the probe set; writes nothing."""
        self._prepare()
        return collect_passes(models, self.layers, self._loader, self.detector, self.device, layouts=self.layouts,
                              amp=self.cfg.amp, mean=self.cfg.probe.mean, std=self.cfg.probe.std,
                              progress=self._progress(label))

    def _progress(self, label: str, every_s: float = 10.0) -> Callable[[int, int], None]:
        """Logs how far the pass is every ``every_s`` seconds, so long runs show life."""
        state = {"next": time.monotonic() + every_s}

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now >= state["next"]:
                self.log(f"{label}: {done}/{total} probe images")
                state["next"] = now + every_s

        return report

    # ------------------------------------------------------------------------- dissecting

    def _pass(self, models: list[torch.nn.Module], label: str) -> list[dict[str, LayerResult]]:
        if not getattr(self, "_manifest_written", False):
            manifest = self.manifest()
            store.write_json(self.out / store.MANIFEST, manifest)
            self.run, self._manifest_written = manifest["run"], True
        return self.label(models, label)

    def _write_epoch(self, epoch: int, source: str, sha: str, results: dict[str, LayerResult],
                     seconds: float) -> tuple[pd.DataFrame, dict]:
        """The epoch's tables first, its record last: an epoch without a record is redone."""
        dissect_df, images_df = result_tables(results, self.detector, self.probe, run=self.run, epoch=epoch,
                                              top_k=self.cfg.top_k)
        tables = {
            "dissect": store.write_table(store.dissect_path(self.out, epoch), dissect_df, store.DISSECT),
            "top_images": store.write_table(store.top_images_path(self.out, epoch), images_df, store.TOP_IMAGES),
        }
        summary = layer_summary(dissect_df, self.layers)
        store.write_json(
            store.epoch_record_path(self.out, epoch),
            {
                "epoch": epoch,
                "checkpoint": source,
                "sha256": sha,
                "config_fingerprint": self.fingerprint,
                "tables": tables,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
                "layers": summary,
            },
        )
        line = ", ".join(f"{layer} {v['interpretable']}/{v['neurons']}" + (f" ({v['dead']} dead)" if v["dead"] else "")
                         for layer, v in summary.items())
        self.log(f"epoch {epoch}: done in {seconds:.1f}s; interpretable neurons: {line}")
        return dissect_df, summary

    def dissect_current(self, epoch: int, source: str, sha: str) -> tuple[pd.DataFrame, dict]:
        """Dissect ``self.model`` as it is now (a live training model) and write the epoch."""
        self.check_folder([epoch])
        t0 = time.perf_counter()
        was_training = self.model.training
        try:
            results = self._pass([self.model], f"epoch {epoch}")[0]
        finally:
            self.model.train(was_training)
        return self._write_epoch(epoch, source, sha, results, time.perf_counter() - t0)

    def per_pass(self, n_checkpoints: int) -> int:
        """Checkpoints whose models share one decode of the probe set: ``--checkpoints-per-pass``,
        else as many as a quarter of the device's free memory holds (at most 8)."""
        if self.checkpoints_per_pass is not None:
            return self.checkpoints_per_pass
        if n_checkpoints <= 1:
            return 1
        per_model = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        per_model += self.detector_state_bytes()
        budget = available_bytes(self.device) // 4
        return int(max(1, min(AUTO_MAX_CHECKPOINTS_PER_PASS, n_checkpoints, budget // max(per_model, 1))))

    def detector_state_bytes(self) -> int:
        """A rough upper estimate of one checkpoint's accumulator state over all layers:
        about 2 % of a layer's values (NetDissect's top values and candidates), and at
        least one value per image and unit (CLIP-Dissect's pooled activations)."""
        n = len(self.probe)
        total = 0
        for resolved in self.layouts.values():
            h, w = resolved.grid or (1, 1)
            total += 4 * max(n * resolved.channels * h * w // 50, n * resolved.channels)
        return total

    def dissect_files(self, files: list[CheckpointFile], trust: bool = False) -> list[int]:
        """Dissect every file not already done, several checkpoints per decode of the probe set."""
        self.check_folder([f.epoch for f in files])
        todo = []
        for ckpt in files:
            sha = checkpoint_sha256(ckpt.path)  # a file, or a Hugging Face folder's weight files
            if self.is_done(ckpt.epoch, sha):
                self.log(f"epoch {ckpt.epoch}: already dissected, skipping (--force redoes it)")
            else:
                todo.append((ckpt, sha))
        done: list[int] = []
        if not todo:
            return done
        group = self.per_pass(len(todo))
        if group > 1:
            self.log(f"{len(todo)} checkpoints, {group} per pass over the probe set "
                     f"({-(-len(todo) // group)} pass(es))")
        for start in range(0, len(todo), group):
            chunk = todo[start:start + group]
            models = []
            for ckpt, _ in chunk:
                models.append(self.load(ckpt, trust, fresh=bool(models)))
            epochs = [c.epoch for c, _ in chunk]
            names = ", ".join(c.path.name for c, _ in chunk)
            self.log(f"epoch{'s' if len(chunk) > 1 else ''} {', '.join(map(str, epochs))}: dissecting {names} "
                     f"on {self.device} ({len(self.probe)} probe images)")
            t0 = time.perf_counter()
            results = self._pass(models, f"epoch{'s' if len(chunk) > 1 else ''} {', '.join(map(str, epochs))}")
            seconds = (time.perf_counter() - t0) / len(chunk)
            for (ckpt, sha), result in zip(chunk, results):
                self._write_epoch(ckpt.epoch, str(ckpt.path.resolve()), sha, result, seconds)
                done.append(ckpt.epoch)
            del models, results
        return done

    def load(self, ckpt: CheckpointFile, trust: bool = False, fresh: bool = False) -> torch.nn.Module:
        """The model with ``ckpt``'s weights (``fresh``: a copy, so several can be held at once)."""
        model = copy.deepcopy(self.model) if fresh else self.model
        self.weights.load(ckpt.path, trust, model=model)
        return model

    def dissect_file(self, ckpt: CheckpointFile, trust: bool = False) -> bool:
        """Dissect one checkpoint file unless already done; True when it was dissected now."""
        return bool(self.dissect_files([ckpt], trust))


def layer_summary(dissect_df: pd.DataFrame, layers: list[str]) -> dict:
    """Per layer: interpretable, neurons, dead, distinct concepts among interpretable neurons."""
    best = dissect_df[dissect_df["rank"] == 0]
    summary = {}
    for layer in layers:
        mine = best[best.layer == layer]
        summary[layer] = {"interpretable": int(mine.interpretable.sum()), "neurons": int(len(mine)),
                          "dead": int(mine.dead.sum()),
                          "concepts": int(mine[mine.interpretable].concept.nunique())}
    return summary


def state_sha256(model: torch.nn.Module) -> str:
    """Hash of a live model's weights, standing in for a checkpoint file's hash."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dissect_run(
    cfg: Config,
    *,
    ckpts: str | Path | None = None,
    out: str | Path | None = None,
    epochs: list[int] | None = None,
    force: bool = False,
    shard: tuple[int, int] | None = None,
    trust_checkpoints: bool = False,
    checkpoints_per_pass: int | None = None,
    log: Callable[[str], None] = print,
) -> list[int]:
    """Dissect every (selected) checkpoint; returns the epochs written in this call."""
    ckpt_dir = resolve_ckpt_dir(cfg, ckpts)
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise ConfigError(f"--shard: expected I/N with 0 <= I < N, got {shard[0]}/{shard[1]}")
    files = select_checkpoints(find_checkpoints(ckpt_dir, trust_checkpoints), epochs, shard)
    dissector = Dissector(cfg, out, checkpoints=ckpt_dir, force=force, log=log,
                          checkpoints_per_pass=checkpoints_per_pass)
    return dissector.dissect_files(files, trust_checkpoints)
