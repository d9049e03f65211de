"""Hand-made conceptmon output folders (dissection tables + manifest), a fake text encoder,
and a reader for the figure JSON inside Plotly HTML files. Reusable by any test::

    out = make_run(tmp_path / "out", epochs=[1, 2, 3], layers=["layer4"], n_neurons=16)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from conceptmon import store
from conceptmon.config import Config
from conceptmon.encoders import TextEncoder, register_encoder

DEFAULT_CONCEPTS = (
    ("red", "color"), ("green", "color"), ("blue", "color"), ("yellow", "color"),
    ("striped", "texture"), ("dotted", "texture"), ("zigzagged", "texture"),
    ("wood", "material"), ("metal", "material"), ("dog", "object"), ("car", "object"),
    ("windmill", "object"), ("wheel", "part"), ("field", "scene"), ("living_room", "scene"),
    ("street", "scene"),
)


@register_encoder
class HashEncoder(TextEncoder):
    """Deterministic random unit vectors seeded by the text: fast, offline, no model."""

    kind = "hashvec"
    dim = 16
    calls: list[list[str]] = []  # every encode() batch, to check what the cache spared

    def fingerprint(self) -> str:
        return f"hashvec-{self.dim}"

    def _encode(self, texts):
        HashEncoder.calls.append(list(texts))
        return np.stack([hash_vector(t, self.dim) for t in texts])


def hash_vector(text: str, dim: int = HashEncoder.dim) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def write_probe_images(root: Path, n: int) -> list[str]:
    """n tiny PNGs (flat colours) under root; returns their relative paths."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(n):
        rel = f"images/img_{i:03d}.png"
        Image.new("RGB", (20, 20), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(root / rel)
        rels.append(rel)
    return rels


def make_run(
    out: Path,
    epochs=(1, 2, 3),
    layers=("layer3", "layer4"),
    n_neurons: int = 8,
    concepts=DEFAULT_CONCEPTS,
    seed: int = 0,
    *,
    top_k: int = 5,
    change: float = 0.3,
    threshold: float = 0.04,
    probe_root: Path | None = None,
    n_images: int = 12,
    embedding: dict | None = None,
    run: str = "run",
) -> Path:
    """Write a finished dissection of ``epochs`` x ``layers`` x ``n_neurons`` into ``out``.

    Epoch one draws top-k distinct concepts and descending scores per neuron; each later
    epoch redraws a ``change`` fraction of neurons and copies the rest exactly. Concepts
    are (name, category) pairs or bare names. With ``probe_root`` real images are written
    there and referenced by the top-images tables.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    pairs = [c if isinstance(c, tuple) else (c, "other") for c in concepts]
    names = np.array([p[0] for p in pairs], dtype=object)
    cats = np.array([p[1] for p in pairs], dtype=object)
    k = min(top_k, len(names))
    if probe_root is not None:
        images = np.array(write_probe_images(probe_root, n_images), dtype=object)
    else:
        images = np.array([f"images/img_{i:03d}.png" for i in range(n_images)], dtype=object)

    def draw(n: int):
        idx = np.argsort(rng.random((n, len(names))), axis=1)[:, :k]
        scores = -np.sort(-rng.uniform(0.0, 0.3, size=(n, k)), axis=1)
        top = np.argsort(rng.random((n, len(images))), axis=1)[:, : min(10, len(images))]
        return idx, scores, top

    state = {layer: draw(n_neurons) for layer in layers}
    config = Config(layers=list(layers), top_k=top_k, run=run).to_dict()
    config["embedding"].update(embedding or {})  # may name library-only settings (map_method, placement)
    manifest = {
        "run": run,
        "config": config,
        "detector": {"name": "netdissect", "threshold": threshold},
        "concepts": {"names": list(names), "categories": list(cats), "fingerprint": "test", "source": "test"},
        "probe": {"name": "synthetic", "root": str(Path(probe_root).resolve()) if probe_root else str(out / "no-probe"),
                  "fingerprint": "test", "n_images": len(images)},
        "versions": {},
        "checkpoints": str(out / "ckpts"),
        "layers": list(layers),
    }
    store.write_json(out / store.MANIFEST, manifest)
    conf_rng = np.random.default_rng(seed + 1000)  # its own stream: the labels stay as before
    for t, epoch in enumerate(epochs):
        dissect_parts, image_parts = [], []
        for layer in layers:
            if t > 0:
                idx, scores, top = state[layer]
                redraw = rng.random(n_neurons) < change
                new = draw(n_neurons)
                state[layer] = tuple(np.where(redraw[:, None], b, a) for a, b in zip((idx, scores, top), new))
            idx, scores, top = state[layer]
            interpretable = scores[:, 0] >= threshold
            dissect_parts.append(pd.DataFrame({
                "run": run, "epoch": np.int32(epoch), "layer": layer,
                "neuron": np.repeat(np.arange(n_neurons, dtype=np.int32), k),
                "rank": np.tile(np.arange(k, dtype=np.int16), n_neurons),
                "concept": names[idx.reshape(-1)], "category": cats[idx.reshape(-1)],
                "score": scores.reshape(-1).astype(np.float32), "distance": -scores.reshape(-1).astype(np.float32),
                "interpretable": np.repeat(interpretable, k), "dead": False,
                "confidence": np.repeat(conf_rng.uniform(0.3, 1.0, n_neurons).astype(np.float32), k),
                "score_low": (scores.reshape(-1) * 0.8).astype(np.float32),
                "score_high": (scores.reshape(-1) * 1.2).astype(np.float32), "detector": "netdissect",
            }))
            n_top = top.shape[1]
            image_parts.append(pd.DataFrame({
                "epoch": np.int32(epoch), "layer": layer,
                "neuron": np.repeat(np.arange(n_neurons, dtype=np.int32), n_top),
                "rank": np.tile(np.arange(n_top, dtype=np.int16), n_neurons),
                "image": images[top.reshape(-1)],
                "activation": np.tile(np.linspace(5.0, 1.0, n_top, dtype=np.float32), n_neurons),
            }))
        tables = {
            "dissect": store.write_table(store.dissect_path(out, epoch), pd.concat(dissect_parts, ignore_index=True),
                                         store.DISSECT),
            "top_images": store.write_table(store.top_images_path(out, epoch),
                                            pd.concat(image_parts, ignore_index=True), store.TOP_IMAGES),
        }
        store.write_json(store.epoch_record_path(out, epoch),
                         {"epoch": int(epoch), "checkpoint": f"epoch_{epoch}.pt", "sha256": f"{seed}-{epoch}",
                          "config_fingerprint": "test", "tables": tables})
    return out


def set_neuron(out: Path, epoch: int, layer: str, neuron: int, concepts: list[str], scores: list[float]) -> None:
    """Overwrite one neuron's top concepts in one epoch (ranks beyond len(concepts) are removed)."""
    path = store.dissect_path(out, epoch)
    df = store.read_table(path, store.DISSECT)
    mask = (df["layer"] == layer) & (df["neuron"] == neuron)
    template = df[mask].iloc[0]
    df = df[~mask]
    rows = pd.DataFrame({
        "run": template["run"], "epoch": np.int32(epoch), "layer": layer, "neuron": np.int32(neuron),
        "rank": np.arange(len(concepts), dtype=np.int16), "concept": concepts, "category": "other",
        "score": np.asarray(scores, dtype=np.float32), "distance": -np.asarray(scores, dtype=np.float32),
        "interpretable": True, "dead": False, "confidence": np.float32(1.0),
        "score_low": np.asarray(scores, dtype=np.float32), "score_high": np.asarray(scores, dtype=np.float32),
        "detector": template["detector"],
    })
    digest = store.write_table(path, pd.concat([df, rows], ignore_index=True), store.DISSECT)
    record = store.read_json(store.epoch_record_path(out, epoch))  # as a re-dissection would
    record["edits"] = record.get("edits", 0) + 1
    record["tables"]["dissect"] = digest
    store.write_json(store.epoch_record_path(out, epoch), record)


def figure_from_html(path: Path) -> dict:
    """The figure a Plotly HTML file draws: {"data": [...], "layout": {...}, "frames": [...]}.

    Reads the JSON arguments of its ``Plotly.newPlot`` and ``Plotly.addFrames`` calls.
    """
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()

    def args_after(call: str, n: int) -> list:
        pos = text.index(call) + len(call)  # the div id comes first and holds no comma
        values = []
        for _ in range(n):
            pos = text.index(",", pos) + 1
            while text[pos].isspace():
                pos += 1
            value, pos = decoder.raw_decode(text, pos)
            values.append(value)
        return values

    data, layout = args_after("Plotly.newPlot(", 2)
    frames = args_after("Plotly.addFrames(", 1)[0] if "Plotly.addFrames(" in text else []
    return {"data": data, "layout": layout, "frames": frames}


def values(v) -> np.ndarray:
    """A Plotly JSON array as numpy: plain lists, or plotly 6's {"dtype", "bdata"} typed arrays."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        if isinstance(shape, str):  # "3, 2"
            shape = [int(d) for d in shape.split(",")]
        return arr.reshape(shape) if shape else arr
    return np.asarray(v)


def write_epoch(out: Path, epoch: int, dissect: pd.DataFrame, top_images: pd.DataFrame | None = None,
                **record) -> dict:
    """Write one epoch's tables and its record as the engine does (table hashes included)."""
    if top_images is None:
        top_images = pd.DataFrame({n: [] for n in store.TOP_IMAGES.names})
    tables = {
        "dissect": store.write_table(store.dissect_path(out, epoch), dissect, store.DISSECT),
        "top_images": store.write_table(store.top_images_path(out, epoch), top_images, store.TOP_IMAGES),
    }
    full = {"epoch": int(epoch), "checkpoint": f"epoch_{epoch}.pt", "sha256": f"{epoch:064x}",
            "config_fingerprint": "test", **record, "tables": tables}
    store.write_json(store.epoch_record_path(out, epoch), full)
    return full


def write_embedding(out: Path, neurons: pd.DataFrame, distances: pd.DataFrame | None = None,
                    anchors: pd.DataFrame | None = None, **record) -> store.Generation:
    """Write an embed generation by hand, recorded as made from the epoch tables now in ``out``."""
    if distances is None:
        distances = pd.DataFrame({n: [] for n in store.NEURON_ANCHOR_DISTANCE.names})
    if anchors is None:
        anchors = pd.DataFrame({n: pd.Series(dtype=object) for n in store.ANCHORS.names})
    inputs = store.dissect_inputs(store.check_dissect_lineage(out))
    full = {"encoder": "minilm", "settings": {}, "inputs": {"dissect": inputs}, **record}
    with store.new_generation(out, store.EMBED, full) as gen:
        gen.write_table(store.EMBED_FILES["neurons"], neurons, store.EMBED_NEURONS)
        gen.write_table(store.EMBED_FILES["neuron_anchor_distance"], distances, store.NEURON_ANCHOR_DISTANCE)
        gen.write_table(store.EMBED_FILES["anchors"], anchors, store.ANCHORS)
    return gen


def rewrite_epoch_table(out: Path, epoch: int, dissect: pd.DataFrame) -> None:
    """Replace an epoch's DISSECT table as a re-dissection would (its record's hash follows)."""
    record = store.read_json(store.epoch_record_path(out, epoch))
    record["tables"]["dissect"] = store.write_table(store.dissect_path(out, epoch), dissect, store.DISSECT)
    store.write_json(store.epoch_record_path(out, epoch), record)


FAST_EMBEDDING = {"encoder": "hashvec", "map_method": "pca"}
"""Embedding settings for tests: the offline hash encoder and an instant linear map."""


def quiet(_message) -> None:
    """A log that says nothing."""


def save_checkpoints(folder: Path, models: dict) -> Path:
    """``{epoch: model}`` saved as ``folder/epoch_NNNN.pt`` the way training scripts save them."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for epoch, model in models.items():
        torch.save({"epoch": epoch, "state_dict": model.state_dict()}, folder / f"epoch_{epoch:04d}.pt")
    return folder
