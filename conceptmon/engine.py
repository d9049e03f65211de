"""The dissection engine: checkpoints -> one forward pass per batch -> per-epoch Parquet.

``dissect_run`` is what ``conceptmon dissect`` calls; ``dissect_model`` labels the
neurons of one in-memory model and is what the training-loop API builds on.
"""
from __future__ import annotations

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
from .config import Config, ConfigError, resolve_out, run_name
from .detectors import Detector, LayerScores, RunContext, TrustSettings, create_detector, rank_concepts
from .errors import ConceptmonError
from .hooks import LayerTrace, resolve_layers
from .models import build_model, resolve_device
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
        """per_image: (B, U) one value per image and unit."""
        vals = per_image.t()
        idx = index.to(vals.device)[None, :].expand_as(vals)
        if self.values is not None:
            vals = torch.cat([self.values, vals], dim=1)
            idx = torch.cat([self.index, idx], dim=1)
        top = vals.topk(min(self.k, vals.shape[1]), dim=1)
        self.values, self.index = top.values, torch.gather(idx, 1, top.indices)


def per_image_max(acts: torch.Tensor) -> torch.Tensor:
    """(B, U) maximum of each unit's output per image: spatial max of maps, tokens' max."""
    if acts.dim() == 4:
        return acts.amax(dim=(2, 3))
    if acts.dim() == 3:
        return acts.amax(dim=1)
    return acts


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


# ----------------------------------------------------------------------------- one model


@dataclass
class LayerResult:
    labels: LayerScores  # (U, M) scores, dead units, confidence
    top_values: torch.Tensor  # (U, k) activations of the top images
    top_index: torch.Tensor  # (U, k) probe indices

    @property
    def scores(self) -> torch.Tensor:
        return self.labels.scores


def make_loader(probe: ProbeSet, cfg: Config, device: torch.device):
    dataset = ImageDataset(probe, cfg.probe.image_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def collect_layers(
    model: torch.nn.Module,
    layers: list[str],
    loader,
    detector: Detector,
    device: torch.device,
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
) -> dict[str, LayerResult]:
    """One forward pass per batch feeds every layer's detector accumulator and top images."""
    model.eval().to(device)
    accs, tops = {}, {name: TopImages() for name in layers}
    total = len(loader.dataset)
    done = 0
    with torch.no_grad(), LayerTrace(model, layers) as trace:
        for x, index in loader:
            x = normalize(x.to(device, non_blocking=True), mean, std)
            with torch.autocast(device.type, enabled=amp):
                outputs = trace.run(x)
            for name in layers:
                act = outputs[name].float()
                if not torch.isfinite(act).all():
                    raise ActivationError(
                        f"layer {name}: NaN or infinite activations (images {int(index[0])}..{int(index[-1])}); "
                        f"is the checkpoint diverged?"
                    )
                if name not in accs:
                    accs[name] = detector.accumulator(name, act.shape[1] if act.dim() != 3 else act.shape[2])
                accs[name].add(act, index)
                tops[name].add(per_image_max(act), index)
            done += x.shape[0]
            if progress:
                progress(done, total)
    return {
        name: LayerResult(LayerScores.of(accs[name].scores()), tops[name].values, tops[name].index)
        for name in layers
    }


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


def config_fingerprint(cfg: Config) -> str:
    """Hash of what changes dissection results (not device, batch size, paths or workers)."""
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("model", "layers", "probe", "detector", "concepts", "top_k")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def versions() -> dict:
    import torchvision

    return {
        "conceptmon": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _manifest(cfg: Config, out: Path, ckpt_dir: str, probe: ProbeSet, detector: Detector, fingerprint: str) -> dict:
    concepts = detector.concepts
    return {
        "run": run_name(cfg, out),
        "config": cfg.to_dict(),
        "config_fingerprint": fingerprint,
        "detector": detector.settings(),
        "concepts": {
            "names": list(concepts.names),
            "categories": list(concepts.categories),
            "fingerprint": concepts.fingerprint(),
            "source": concepts.source,
        },
        "probe": {
            "name": probe.name,
            "root": str(Path(probe.root).resolve()),
            "fingerprint": probe.fingerprint(),
            "n_images": len(probe),
        },
        "layers": list(cfg.layers),
        "checkpoints": ckpt_dir,
        "versions": versions(),
    }


def _check_previous(out: Path, fingerprint: str, cfg: Config, force: bool) -> None:
    path = out / store.MANIFEST
    if not path.exists() or force:
        return
    old = store.read_json(path)
    if old.get("config_fingerprint") == fingerprint or not store.finished_epochs(out):
        return
    keys = ("model", "layers", "probe", "detector", "concepts", "top_k")
    diff = _config_diff({k: old.get("config", {}).get(k) for k in keys}, {k: cfg.to_dict()[k] for k in keys})
    what = "; ".join(diff[:3]) or "settings differ"
    raise ConfigError(
        f"{out}: holds results made with another config ({what}); pass --force to redo them, or use another --out"
    )


def select_checkpoints(
    files: list[CheckpointFile], epochs: list[int] | None, shard: tuple[int, int] | None
) -> list[CheckpointFile]:
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


class Dissector:
    """What stays fixed across the checkpoints of one run, checked and prepared once.

    Everything that can be checked is checked in the constructor, before any forward
    pass or output: the architecture, the layer names, the probe set, the detector and
    the output folder's previous config.
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
    ):
        self.cfg = cfg
        self.out = resolve_out(cfg, str(out) if out else None)
        self.log = log
        self.force = force
        # [h3] specs and hf: folders are also looked up beside the config file
        self.model = model if model is not None else build_model(cfg.model, config_path=cfg.source)
        resolve_layers(self.model, cfg.layers)
        if model is not None:  # a live training model stays where it is
            param = next(model.parameters(), None)
            self.device = param.device if param is not None else resolve_device(cfg.device)
        else:
            self.device = resolve_device(cfg.device)
        self.probe = create_probe(cfg.probe)
        cache = Path(cfg.cache_dir) if cfg.cache_dir else store.cache_dir(self.out)
        self.ctx = RunContext(
            device=self.device, cache_dir=cache, batch_size=cfg.batch_size, num_workers=cfg.num_workers, log=log,
            trust=TrustSettings(cfg.trust.replicates, cfg.trust.seed),
        )
        self.detector = create_detector(cfg, self.probe, self.ctx)
        self.fingerprint = config_fingerprint(cfg)
        _check_previous(self.out, self.fingerprint, cfg, force)
        self.checkpoints = str(Path(checkpoints).resolve()) if checkpoints else "(in memory)"
        self.weights = WeightLoader(self.model, log)  # [h3] transformers models load via from_pretrained
        self._loader = None

    def is_done(self, epoch: int, sha: str) -> bool:
        record_path = store.epoch_record_path(self.out, epoch)
        if self.force or not record_path.exists():
            return False
        record = store.read_json(record_path)
        return record.get("config_fingerprint") == self.fingerprint and record.get("sha256") == sha

    def _prepare(self) -> None:
        if self._loader is not None:
            return
        manifest = _manifest(self.cfg, self.out, self.checkpoints, self.probe, self.detector, self.fingerprint)
        store.write_json(self.out / store.MANIFEST, manifest)
        self.run = manifest["run"]
        self.detector.prepare()
        self._loader = make_loader(self.probe, self.cfg, self.device)

    def _progress(self, epoch: int, every_s: float = 10.0) -> Callable[[int, int], None]:
        """Logs how far the pass is every ``every_s`` seconds, so long runs show life."""
        state = {"next": time.monotonic() + every_s}

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now >= state["next"]:
                self.log(f"epoch {epoch}: {done}/{total} probe images")
                state["next"] = now + every_s

        return report

    def dissect_current(self, epoch: int, source: str, sha: str) -> tuple[pd.DataFrame, dict]:
        """Dissect ``self.model`` as it is now; write the epoch's tables, then its record."""
        self._prepare()
        t0 = time.perf_counter()
        was_training = self.model.training
        try:
            results = collect_layers(self.model, self.cfg.layers, self._loader, self.detector, self.device,
                                     amp=self.cfg.amp, mean=self.cfg.probe.mean, std=self.cfg.probe.std,
                                     progress=self._progress(epoch))
        finally:
            self.model.train(was_training)
        dissect_df, images_df = result_tables(results, self.detector, self.probe, run=self.run, epoch=epoch,
                                              top_k=self.cfg.top_k)
        # Tables first, record last: an epoch without its record is simply redone.
        store.write_table(store.dissect_path(self.out, epoch), dissect_df, store.DISSECT)
        store.write_table(store.top_images_path(self.out, epoch), images_df, store.TOP_IMAGES)
        best = dissect_df[dissect_df["rank"] == 0]
        summary = {
            layer: {"interpretable": int(best[best.layer == layer].interpretable.sum()),
                    "neurons": int((best.layer == layer).sum()),
                    "concepts": int(best[(best.layer == layer) & best.interpretable].concept.nunique())}
            for layer in self.cfg.layers
        }
        seconds = time.perf_counter() - t0
        store.write_json(
            store.epoch_record_path(self.out, epoch),
            {
                "epoch": epoch,
                "checkpoint": source,
                "sha256": sha,
                "config_fingerprint": self.fingerprint,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
                "layers": summary,
            },
        )
        line = ", ".join(f"{layer} {v['interpretable']}/{v['neurons']}" for layer, v in summary.items())
        self.log(f"epoch {epoch}: done in {seconds:.1f}s; interpretable neurons: {line}")
        return dissect_df, summary

    def dissect_file(self, ckpt: CheckpointFile, trust: bool = False) -> bool:
        """Dissect one checkpoint file unless already done; True when it was dissected now."""
        sha = checkpoint_sha256(ckpt.path)  # [h3] a file, or a Hugging Face folder's weight files
        if self.is_done(ckpt.epoch, sha):
            self.log(f"epoch {ckpt.epoch}: already dissected, skipping (--force redoes it)")
            return False
        self.weights.load(ckpt.path, trust)  # [h3]
        self.log(f"epoch {ckpt.epoch}: dissecting {ckpt.path.name} on {self.device} ({len(self.probe)} probe images)")
        self.dissect_current(ckpt.epoch, str(ckpt.path.resolve()), sha)
        return True


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
    log: Callable[[str], None] = print,
) -> list[int]:
    """Dissect every (selected) checkpoint; returns the epochs written in this call."""
    ckpt_dir = resolve_ckpt_dir(cfg, ckpts)
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise ConfigError(f"--shard: expected I/N with 0 <= I < N, got {shard[0]}/{shard[1]}")
    files = select_checkpoints(find_checkpoints(ckpt_dir, trust_checkpoints), epochs, shard)
    dissector = Dissector(cfg, out, checkpoints=ckpt_dir, force=force, log=log)
    return [f.epoch for f in files if dissector.dissect_file(f, trust_checkpoints)]
