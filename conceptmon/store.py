"""Output layout, the one definition of every Parquet schema, and atomic writes.

Everything conceptmon writes lives under one output folder::

    OUT/conceptmon.json                      run manifest (config, versions, probe fingerprint)
    OUT/dissect/epoch_NNNN.parquet           DISSECT schema, one row per (layer, neuron, rank)
    OUT/dissect/top_images_epoch_NNNN.parquet  TOP_IMAGES schema
    OUT/dissect/epoch_NNNN.json              record of a finished epoch (checkpoint hash, config hash)
    OUT/embed/neurons.parquet                EMBED_NEURONS schema
    OUT/embed/anchors.parquet                ANCHORS schema
    OUT/embed/neuron_anchor_distance.parquet NEURON_ANCHOR_DISTANCE schema
    OUT/stats/*.parquet                      statistics tables
    OUT/plots/*.html                         interactive figures
    OUT/report.html                          one self-contained report
    OUT/cache/                               probe, CLIP and text-embedding caches

Per-epoch record files (rather than one mutable manifest) let several shards write to
one folder at once: the manifest's epoch list is the union of the records, read on demand.
"""
from __future__ import annotations

from .errors import ConceptmonError

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "conceptmon.json"

_UMASK = os.umask(0)
os.umask(_UMASK)

DISSECT = pa.schema(
    [
        ("run", pa.string()),
        ("epoch", pa.int32()),
        ("layer", pa.string()),
        ("neuron", pa.int32()),
        ("rank", pa.int16()),
        ("concept", pa.string()),
        ("category", pa.string()),
        ("score", pa.float32()),
        ("distance", pa.float32()),
        ("interpretable", pa.bool_()),
        ("dead", pa.bool_()),
        ("confidence", pa.float32()),
        ("score_low", pa.float32()),
        ("score_high", pa.float32()),
        ("detector", pa.string()),
    ]
)
"""One row per (layer, neuron, rank) for the top-k concepts; a *dead* unit has a single
rank-0 row with null concept and category, score 0, not interpretable. ``confidence``
(same on every row of a neuron) is the bootstrap share of resamples whose top-1 concept
is the reported one, and ``score_low``/``score_high`` a 90 % interval of the top-1
score; all three are NaN when the bootstrap is off (``trust.replicates: 0``)."""

TOP_IMAGES = pa.schema(
    [
        ("epoch", pa.int32()),
        ("layer", pa.string()),
        ("neuron", pa.int32()),
        ("rank", pa.int16()),
        ("image", pa.string()),
        ("activation", pa.float32()),
    ]
)

EMBED_NEURONS = pa.schema(
    [
        ("epoch", pa.int32()),
        ("layer", pa.string()),
        ("neuron", pa.int32()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("top_concept", pa.string()),
        ("score", pa.float32()),
        ("interpretable", pa.bool_()),
        ("embedding", pa.list_(pa.float32())),
    ]
)

ANCHORS = pa.schema(
    [
        ("concept", pa.string()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("embedding", pa.list_(pa.float32())),
    ]
)

NEURON_ANCHOR_DISTANCE = pa.schema(
    [
        ("epoch", pa.int32()),
        ("layer", pa.string()),
        ("neuron", pa.int32()),
        ("anchor", pa.string()),
        ("distance", pa.float32()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "dissect": DISSECT,
    "top_images": TOP_IMAGES,
    "embed_neurons": EMBED_NEURONS,
    "anchors": ANCHORS,
    "neuron_anchor_distance": NEURON_ANCHOR_DISTANCE,
}

# Statistics tables (OUT/stats/<name>.parquet), written by conceptmon.stats; layer "all" pools layers.
_I, _F, _S = pa.int64(), pa.float64(), pa.string()
STATS_SCHEMAS: dict[str, pa.Schema] = {
    "interpretable": pa.schema(
        [("epoch", _I), ("layer", _S), ("n_neurons", _I), ("n_interpretable", _I), ("share_interpretable", _F)]
    ),
    "categories": pa.schema(
        [("epoch", _I), ("layer", _S), ("category", _S), ("n_interpretable", _I),
         ("share_of_interpretable", _F), ("share_of_neurons", _F)]
    ),
    "concepts": pa.schema(
        [("epoch", _I), ("layer", _S), ("concept", _S), ("category", _S), ("n_neurons", _I), ("n_interpretable", _I)]
    ),
    "changes": pa.schema(
        [("layer", _S), ("neuron", _I), ("epoch_from", _I), ("epoch_to", _I), ("concept_from", _S),
         ("concept_to", _S), ("score_from", _F), ("score_to", _F)]
    ),
    "stability": pa.schema(
        [("layer", _S), ("epoch_from", _I), ("epoch_to", _I), ("n_neurons", _I), ("n_kept", _I), ("share_kept", _F)]
    ),
    "retention": pa.schema(
        [("reference_epoch", _I), ("layer", _S), ("epoch", _I), ("percent", _I), ("n_selected", _I),
         ("n_kept", _I), ("share_kept", _F)]
    ),
    "diversity": pa.schema(
        [("epoch", _I), ("layer", _S), ("n_neurons", _I), ("n_distinct_concepts", _I), ("entropy_bits", _F),
         ("n_distinct_interpretable", _I), ("mean_cosine_distance", _F)]
    ),
    "anchor_neighbors": pa.schema(
        [("anchor", _S), ("epoch", _I), ("rank", _I), ("layer", _S), ("neuron", _I), ("concept", _S), ("distance", _F)]
    ),
    "anchor_distance": pa.schema(
        [("anchor", _S), ("epoch", _I), ("layer", _S), ("k", _I), ("n_neighbors", _I), ("mean_distance", _F)]
    ),
}
SCHEMAS.update({f"stats_{name}": schema for name, schema in STATS_SCHEMAS.items()})


# Embedding caches (encoders.py, embedding.py): one text vector per (encoder, text), and the
# fitted 2-D positions of a map's inputs (vocabulary words + anchors, or neuron vectors).
TEXT_EMBEDDINGS = pa.schema([("text", pa.string()), ("embedding", pa.list_(pa.float32()))])
MAP_POSITIONS = pa.schema([("term", pa.string()), ("x", pa.float32()), ("y", pa.float32())])
SCHEMAS["text_embeddings"] = TEXT_EMBEDDINGS
SCHEMAS["map_positions"] = MAP_POSITIONS


class StoreError(ConceptmonError):
    """An output folder or table that is missing or not what conceptmon wrote."""


# ----------------------------------------------------------------------------- layout


def epoch_stem(epoch: int) -> str:
    return f"epoch_{int(epoch):04d}"


def dissect_dir(out: Path) -> Path:
    return Path(out) / "dissect"


def dissect_path(out: Path, epoch: int) -> Path:
    return dissect_dir(out) / f"{epoch_stem(epoch)}.parquet"


def top_images_path(out: Path, epoch: int) -> Path:
    return dissect_dir(out) / f"top_images_{epoch_stem(epoch)}.parquet"


def epoch_record_path(out: Path, epoch: int) -> Path:
    return dissect_dir(out) / f"{epoch_stem(epoch)}.json"


def embed_dir(out: Path) -> Path:
    return Path(out) / "embed"


def stats_dir(out: Path) -> Path:
    return Path(out) / "stats"


def plots_dir(out: Path) -> Path:
    return Path(out) / "plots"


def cache_dir(out: Path) -> Path:
    return Path(out) / "cache"


# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    A process killed mid-write leaves at most a ``.tmp-*`` file that readers ignore,
    never a truncated table under the real name.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot create folder ({e.strerror or e})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot write here ({e.strerror or e})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; shared outputs need the usual mode
        os.replace(tmp_path, path)
    except OSError as e:  # disk full, quota, permissions: one line, and nothing half-written left
        raise StoreError(f"{path}: could not write ({e.strerror or e})") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from None


def to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Cast a DataFrame to ``schema`` exactly: missing or extra columns are a bug, said loudly."""
    names = list(schema.names)
    missing = [n for n in names if n not in df.columns]
    extra = [c for c in df.columns if c not in names]
    if missing or extra:
        raise StoreError(f"table does not fit its schema: missing {missing}, unexpected {extra}")
    return pa.Table.from_pandas(df[names], schema=schema, preserve_index=False)


def write_table(path: Path, df: pd.DataFrame, schema: pa.Schema) -> None:
    table = to_arrow(df, schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_table(path: Path, schema: pa.Schema | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: missing")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise StoreError(f"{path}: not a readable Parquet file ({e})") from None
    if schema is not None:
        missing = [n for n in schema.names if n not in table.column_names]
        if missing:
            raise StoreError(f"{path}: missing columns {missing}")
        table = table.select(schema.names).cast(schema)
    return table.to_pandas()


# ----------------------------------------------------------------------------- readers


def finished_epochs(out: Path) -> list[int]:
    """Epochs whose dissection finished (record written after both tables)."""
    d = dissect_dir(out)
    if not d.is_dir():
        return []
    epochs = []
    for p in d.glob("epoch_*.json"):
        try:
            epochs.append(int(p.stem.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(epochs)


def read_epoch_records(out: Path) -> dict[int, dict]:
    return {e: read_json(epoch_record_path(out, e)) for e in finished_epochs(out)}


def read_dissect(out: Path, epochs: list[int] | None = None) -> pd.DataFrame:
    """All finished epochs' dissection rows as one DataFrame (DISSECT columns)."""
    done = finished_epochs(out)
    if not done:
        raise StoreError(
            f"{out}: no dissection results (run `conceptmon dissect` first, or pass --out)"
        )
    if epochs is not None:
        unknown = sorted(set(epochs) - set(done))
        if unknown:
            raise StoreError(f"{out}: epochs {unknown} not dissected; available: {done}")
        done = [e for e in done if e in set(epochs)]
    frames = [read_table(dissect_path(out, e), DISSECT) for e in done]
    return pd.concat(frames, ignore_index=True)


def read_top_images(out: Path, epochs: list[int] | None = None) -> pd.DataFrame:
    done = finished_epochs(out)
    if epochs is not None:
        done = [e for e in done if e in set(epochs)]
    frames = [read_table(top_images_path(out, e), TOP_IMAGES) for e in done]
    if not frames:
        return pd.DataFrame({n: pd.Series(dtype=object) for n in TOP_IMAGES.names})
    return pd.concat(frames, ignore_index=True)


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.exists():
        raise StoreError(f"{path}: missing (is {out} a conceptmon output folder?)")
    manifest = read_json(path)
    manifest["epochs"] = {str(e): r for e, r in read_epoch_records(out).items()}
    return manifest
