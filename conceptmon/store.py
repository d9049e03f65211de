"""Output layout, the one definition of every Parquet schema and path, atomic writes, lineage.

Everything conceptmon writes lives under one output folder::

    OUT/conceptmon.json                       run manifest (config, versions, probe fingerprint)
    OUT/dissect/epoch_NNNN.parquet            DISSECT schema, one row per (layer, neuron, rank)
    OUT/dissect/epoch_NNNN.json               record of a finished epoch: checkpoint hash, config
                                              fingerprint, the SHA-256 of both of its tables
    OUT/top_images/epoch_NNNN.parquet         TOP_IMAGES schema
    OUT/embed/current.json                    points at the current embed generation, with its inputs
    OUT/embed/<generation>/neurons.parquet    EMBED_NEURONS schema (and anchors, neuron_anchor_distance)
    OUT/stats/current.json, OUT/stats/<generation>/<table>.parquet   statistics tables (schemas
                                              declared in conceptmon.stats)
    OUT/validate.json                         final-layer accuracy of the detector (conceptmon validate)
    OUT/plots/*.html                          interactive figures
    OUT/report.html                           one self-contained report

so that every ``OUT/<table>/*.parquet`` glob reads one table. Caches that depend only on
the probe set (decoded masks, CLIP features, text vectors, fitted maps) live in the user
cache (:func:`user_cache_dir`, ``~/.cache/conceptmon``), keyed by what they depend on, so
every run on this machine shares them; ``cache_dir:`` in the config overrides it.

Per-epoch record files (rather than one mutable manifest) let several shards write to
one folder at once: the manifest's epoch list is the union of the records, read on demand.
Commands that write several files (embed, stats) write a new *generation* folder and then
switch one pointer file atomically (:func:`new_generation`), so a kill at any moment
leaves the previous generation or the new one, never a mix.
"""
from __future__ import annotations

from .errors import ConceptmonError

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "conceptmon.json"
VALIDATE = "validate.json"
"""``conceptmon validate``'s last result (final-layer accuracy per epoch)."""

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

# Statistics tables are declared with their statistic (conceptmon.stats.STATISTICS): one
# generation of OUT/stats holds one <name>.parquet per statistic.


# Embedding caches (encoders.py, embedding.py): one text vector per (encoder, text), and the
# fitted 2-D positions of a map's inputs (vocabulary words + anchors, or neuron vectors).
TEXT_EMBEDDINGS = pa.schema([("text", pa.string()), ("embedding", pa.list_(pa.float32()))])
MAP_POSITIONS = pa.schema([("term", pa.string()), ("x", pa.float32()), ("y", pa.float32())])
SCHEMAS["text_embeddings"] = TEXT_EMBEDDINGS
SCHEMAS["map_positions"] = MAP_POSITIONS


class StoreError(ConceptmonError):
    """An output folder or table that is missing or not what conceptmon wrote."""


class StaleError(StoreError):
    """An input that no longer matches what a result recorded: names the file and the
    command that refreshes it."""


# ----------------------------------------------------------------------------- layout


def epoch_stem(epoch: int) -> str:
    return f"epoch_{int(epoch):04d}"


def dissect_dir(out: Path) -> Path:
    return Path(out) / "dissect"


def dissect_path(out: Path, epoch: int) -> Path:
    return dissect_dir(out) / f"{epoch_stem(epoch)}.parquet"


def epoch_record_path(out: Path, epoch: int) -> Path:
    return dissect_dir(out) / f"{epoch_stem(epoch)}.json"


def top_images_dir(out: Path) -> Path:
    return Path(out) / "top_images"


def top_images_path(out: Path, epoch: int) -> Path:
    return top_images_dir(out) / f"{epoch_stem(epoch)}.parquet"


def legacy_top_images_path(out: Path, epoch: int) -> Path:
    """Where conceptmon 0.1 wrote top images (beside the dissect tables); read for one release."""
    return dissect_dir(out) / f"top_images_{epoch_stem(epoch)}.parquet"


EMBED = "embed"
STATS = "stats"
EMBED_FILES = {"neurons": "neurons.parquet", "anchors": "anchors.parquet",
               "neuron_anchor_distance": "neuron_anchor_distance.parquet"}
"""Tables of one embed generation, by name."""


def embed_dir(out: Path) -> Path:
    return Path(out) / EMBED


def stats_dir(out: Path) -> Path:
    return Path(out) / STATS


def plots_dir(out: Path) -> Path:
    return Path(out) / "plots"


def plot_path(out: Path, name: str) -> Path:
    """``OUT/plots/<name>`` (name includes the extension)."""
    return plots_dir(out) / name


def report_path(out: Path) -> Path:
    return Path(out) / "report.html"


def cache_dir(out: Path) -> Path:
    """The cache conceptmon 0.1 kept per output folder (still honoured by ``cache_dir: OUT/cache``)."""
    return Path(out) / "cache"


def user_cache_dir() -> Path:
    """Caches shared by every run on this machine: $CONCEPTMON_CACHE, else
    $XDG_CACHE_HOME/conceptmon, else ~/.cache/conceptmon."""
    explicit = os.environ.get("CONCEPTMON_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "conceptmon"


def resolve_cache_dir(configured: str | Path | None) -> Path:
    """The config's ``cache_dir`` when set, else :func:`user_cache_dir`."""
    return Path(configured).expanduser() if configured else user_cache_dir()


def mask_cache_dir(cache: Path, probe_fingerprint: str) -> Path:
    return Path(cache) / "masks" / probe_fingerprint


def clip_cache_dir(cache: Path) -> Path:
    return Path(cache) / "clip"


def text_cache_dir(cache: Path) -> Path:
    return Path(cache) / "text"


def map_cache_dir(cache: Path) -> Path:
    return Path(cache) / "maps"


def file_hash_table(cache: Path, key: str) -> Path:
    """Remembered content hashes of one probe root's files (see probes.base.FileHashes)."""
    return Path(cache) / "file-hashes" / f"{key}.json"


def synthetic_cache_dir(cache: Path) -> Path:
    """Where synthetic probe sets without a configured root are generated."""
    return Path(cache) / "synthetic"


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes: the identity every lineage record uses."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_table(path: Path, df: pd.DataFrame, schema: pa.Schema) -> str:
    """Write ``df`` atomically as Parquet; returns the SHA-256 of the file written."""
    table = to_arrow(df, schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
        digest = sha256_file(tmp)
    return digest


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


# ----------------------------------------------------------------------------- generations


GENERATION_POINTER = "current.json"


@dataclass
class Generation:
    """One complete set of a command's output files, plus the record of what it was made from.

    ``record`` is what the pointer file holds: ``generation`` (the folder name), ``files``
    ({file name: SHA-256}) and whatever the writer adds (settings, input hashes).
    """

    group: str
    folder: Path
    record: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.folder / name

    def write_table(self, name: str, df: pd.DataFrame, schema: pa.Schema) -> str:
        digest = write_table(self.path(name), df, schema)
        self.record.setdefault("files", {})[name] = digest
        return digest

    def stale_files(self) -> list[str]:
        """Files of this generation that are missing or whose bytes changed since written."""
        bad = []
        for name, digest in (self.record.get("files") or {}).items():
            p = self.path(name)
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(name)
        return bad


def read_generation(out: Path, group: str) -> Generation | None:
    """The current generation of ``OUT/<group>``, or None when there is none yet."""
    pointer = Path(out) / group / GENERATION_POINTER
    if not pointer.exists():
        return None
    record = read_json(pointer)
    name = record.get("generation") if isinstance(record, dict) else None
    folder = Path(out) / group / str(name)
    if not name or not folder.is_dir():
        raise StoreError(f"{pointer}: points at a missing generation {name!r}; re-run `conceptmon {group}`")
    return Generation(group, folder, record)


@contextmanager
def new_generation(out: Path, group: str, record: dict | None = None) -> Iterator[Generation]:
    """Write a new generation of ``OUT/<group>``; it becomes current only if the block succeeds.

    The files go to a fresh folder; on success the pointer file is replaced atomically
    (after everything is on disk), then folders of older or abandoned generations are
    removed. A failure or a kill at any point leaves the previous generation current.
    """
    root = Path(out) / group
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{root}: cannot create folder ({e.strerror or e})") from None
    name = f"g{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{os.urandom(3).hex()}"
    gen = Generation(group, root / name, {"generation": name, "files": {}, **(record or {})})
    gen.record["generation"] = name
    try:
        gen.folder.mkdir()
    except OSError as e:
        raise StoreError(f"{gen.folder}: cannot create folder ({e.strerror or e})") from None
    try:
        yield gen
        write_json(root / GENERATION_POINTER, gen.record)
    except BaseException:
        shutil.rmtree(gen.folder, ignore_errors=True)
        raise
    for old in root.iterdir():  # older generations, and ones a killed writer left behind
        if old.is_dir() and old.name.startswith("g") and old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def legacy_outputs(out: Path, group: str) -> bool:
    """True when ``OUT/<group>`` holds conceptmon 0.1 outputs (files without a generation pointer)."""
    root = Path(out) / group
    return root.is_dir() and not (root / GENERATION_POINTER).exists() and any(root.glob("*.parquet"))


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


def _select_epochs(out: Path, epochs: list[int] | None) -> list[int]:
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
    return done


def check_dissect_lineage(out: Path, epochs: list[int] | None = None) -> dict[int, dict]:
    """The records of the chosen epochs, after checking that they belong together.

    Refuses (one line naming the file and the command that fixes it) epochs made with
    different configs, tables whose bytes no longer match their record, and records
    from conceptmon 0.1 (no table hashes).
    """
    out = Path(out)
    chosen = _select_epochs(out, epochs)
    records = {e: read_json(epoch_record_path(out, e)) for e in chosen}
    by_fp: dict[str, list[int]] = {}
    for e, r in records.items():
        by_fp.setdefault(str(r.get("config_fingerprint")), []).append(e)
    if len(by_fp) > 1:
        groups = sorted(by_fp.values(), key=lambda g: (len(g), max(g)), reverse=True)  # majority, then latest
        raise StaleError(
            f"{out}: epochs {groups[1]} were made with another config than epochs {groups[0]}; "
            f"redo them all with `conceptmon dissect --force`, or dissect into another --out"
        )
    for e, r in records.items():
        tables = r.get("tables")
        if not isinstance(tables, dict):
            raise StaleError(f"{epoch_record_path(out, e)}: written by conceptmon 0.1 (no table hashes); "
                             f"re-run `conceptmon dissect --force`")
        path = dissect_path(out, e)
        if not path.is_file() or sha256_file(path) != tables.get("dissect"):
            raise StaleError(f"{path}: does not match its record (changed or truncated); "
                             f"re-run `conceptmon dissect` to redo epoch {e}")
    return records


def dissect_inputs(records: dict[int, dict]) -> dict[str, str]:
    """{epoch: SHA-256 of its dissect table}: what results built on the tables record."""
    return {str(e): str((r.get("tables") or {}).get("dissect")) for e, r in sorted(records.items())}


def read_dissect(out: Path, epochs: list[int] | None = None, *, check: bool = True) -> pd.DataFrame:
    """All finished epochs' dissection rows as one DataFrame (DISSECT columns).

    With ``check`` (the default) the epochs' lineage is verified first
    (:func:`check_dissect_lineage`): results are never mixed across configs or read from
    a table that changed after its record was written.
    """
    done = list(check_dissect_lineage(out, epochs)) if check else _select_epochs(out, epochs)
    frames = [read_table(dissect_path(out, e), DISSECT) for e in done]
    return pd.concat(frames, ignore_index=True)


def read_top_images(out: Path, epochs: list[int] | None = None,
                    log: Callable[[str], None] = lambda m: None) -> pd.DataFrame:
    """Top images of the finished epochs; 0.1's location is read too, with a notice."""
    done = finished_epochs(out)
    if epochs is not None:
        done = [e for e in done if e in set(epochs)]
    frames = []
    for e in done:
        path = top_images_path(out, e)
        if not path.exists() and legacy_top_images_path(out, e).exists():
            path = legacy_top_images_path(out, e)
            log(f"notice: reading {path} (conceptmon 0.1 layout); re-run `conceptmon dissect --force` "
                f"to move top images to {top_images_dir(out)}")
        frames.append(read_table(path, TOP_IMAGES))
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
