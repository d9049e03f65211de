"""Results as scalars for experiment trackers, and a TensorBoard run with a projector.

:func:`scalar_table` names every exported scalar once; the Lightning callback logs the
same names (``conceptmon/<layer>/...``) to the trainer's loggers, and
:func:`export_tensorboard` writes them, step = epoch, into ``LOGDIR/<run>/`` together
with the neuron embeddings for TensorBoard's projector (one tensor per epoch).

Re-exporting replaces ``LOGDIR/<run>/`` as a whole (written beside it, then swapped in),
so scalars are never duplicated; ``conceptmon watch`` can call :func:`export_tensorboard`
after every refresh.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from . import store
from .errors import ConceptmonError

# (table, column, scalar name): one scalar per (epoch, layer).
LAYER_SCALARS = (
    ("interpretable", "n_interpretable", "interpretable"),
    ("interpretable", "share_interpretable", "interpretable_share"),
    ("dead", "n_dead", "dead"),
    ("diversity", "n_distinct_interpretable", "distinct_concepts"),
    ("diversity", "mean_cosine_distance", "spread"),
)
# (table, key column, value column, scalar name): one scalar per (epoch, layer, key).
KEYED_SCALARS = (
    ("categories", "category", "n_interpretable", "category"),
    ("anchor_distance", "anchor", "mean_distance", "anchor_distance"),
)
PROJECTOR_TENSOR = "neurons"
PROJECTOR_COLUMNS = ("epoch", "layer", "neuron", "top_concept", "score", "interpretable", "confidence")
ANCHOR_LAYER = "(anchor)"
"""The layer column of anchor words placed in the projector beside the neurons."""
EXPORT_MARKER = ".conceptmon-export.json"
"""Written into every exported run folder: only such folders are ever replaced."""


class ExportError(ConceptmonError):
    """An export target that cannot be written, or a missing optional package."""


# ----------------------------------------------------------------------------- scalars (pure)


def dead_counts(dissect: pd.DataFrame) -> pd.DataFrame:
    """Dead units (no activation on any probe image) per (epoch, layer)."""
    first = dissect[dissect["rank"] == 0]
    table = first.groupby(["epoch", "layer"], sort=True)["dead"].sum().rename("n_dead").reset_index()
    table["n_dead"] = table["n_dead"].astype(np.int64)
    return table


def scalar_table(tables: dict[str, pd.DataFrame], prefix: str = "") -> pd.DataFrame:
    """Every exported scalar as rows (epoch, tag, value); tags are ``<prefix><layer>/<name>``.

    ``tables``: statistics tables by name (as :func:`conceptmon.stats.stats_run` returns
    them, plus ``dead`` from :func:`dead_counts`). Missing tables and NaN values (the
    spread before ``conceptmon embed``) are skipped.
    """
    parts = []
    for table_name, column, name in LAYER_SCALARS:
        table = tables.get(table_name)
        if table is not None and column in table:
            parts.append(pd.DataFrame({"epoch": table["epoch"], "tag": prefix + table["layer"] + f"/{name}",
                                       "value": table[column]}))
    for table_name, key, column, name in KEYED_SCALARS:
        table = tables.get(table_name)
        if table is not None and column in table:
            parts.append(pd.DataFrame({"epoch": table["epoch"],
                                       "tag": prefix + table["layer"] + f"/{name}/" + table[key].astype(str),
                                       "value": table[column]}))
    if not parts:
        return pd.DataFrame({"epoch": pd.Series(dtype=np.int64), "tag": pd.Series(dtype=object),
                             "value": pd.Series(dtype=np.float64)})
    rows = pd.concat(parts, ignore_index=True)
    rows["value"] = rows["value"].astype(np.float64)
    rows = rows[np.isfinite(rows["value"])]
    rows["epoch"] = rows["epoch"].astype(np.int64)
    return rows.sort_values(["epoch", "tag"], kind="stable").reset_index(drop=True)


def observation_scalars(dissect: pd.DataFrame, categories: Iterable[str] = (), prefix: str = "") -> dict[str, float]:
    """The scalars of one epoch's DISSECT rows (what the Lightning callback logs)."""
    from .stats import category_counts, concept_diversity, interpretable_counts

    tables = {
        "interpretable": interpretable_counts(dissect),
        "categories": category_counts(dissect, list(categories)),
        "diversity": concept_diversity(dissect),
        "dead": dead_counts(dissect),
    }
    rows = scalar_table(tables, prefix)
    return dict(zip(rows["tag"], rows["value"].astype(float)))


def _tsv_cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return re.sub(r"[\t\r\n]", " ", str(value))


def projector_rows(neurons: pd.DataFrame, dissect: pd.DataFrame) -> pd.DataFrame:
    """Neuron metadata for the projector: EMBED_NEURONS rows (in their order) with each neuron's confidence."""
    confidence = dissect[dissect["rank"] == 0][["epoch", "layer", "neuron", "confidence"]]
    columns = [c for c in neurons.columns if c != "embedding"]
    return neurons[columns].merge(confidence, on=["epoch", "layer", "neuron"], how="left")  # keeps the left order


# ----------------------------------------------------------------------------- TensorBoard (I/O)


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ExportError("export tensorboard needs TensorBoard: pip install tensorboard "
                          "(or pip install conceptmon[tensorboard])") from None
    return SummaryWriter


def _read_results(out: Path, log: Callable[[str], None]):
    from .embedding import embed_generation, embedding_matrix, read_anchors, read_neurons
    from .stats import read_fresh_stats, stats_run

    tables = read_fresh_stats(out)
    if tables is None:
        tables = stats_run(out, log=log)
    dissect = store.read_dissect(out)
    tables = {**tables, "dead": dead_counts(dissect)}
    neurons = vectors = anchors = None
    if embed_generation(out) is not None:  # a stale embedding is refused, naming `conceptmon embed`
        neurons = read_neurons(out, with_embedding=True)
        vectors = embedding_matrix(neurons)
        anchors = read_anchors(out)
    else:
        log(f"notice: no embedding in {out} (run `conceptmon embed --out {out}`): exporting scalars only")
    return tables, dissect, neurons, vectors, anchors


def _write_projector(run_dir: Path, neurons: pd.DataFrame, vectors: np.ndarray, dissect: pd.DataFrame,
                     anchors: pd.DataFrame | None) -> int:
    """One projector tensor per epoch (TSV, as TensorBoard's projector reads it); returns their count."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    meta = projector_rows(neurons, dissect)  # row i describes vectors[i]
    anchor_vectors = None
    if anchors is not None and len(anchors):
        anchor_vectors = np.stack(anchors["embedding"].to_numpy()).astype(np.float32)
    config = ProjectorConfig()
    epochs = sorted(int(e) for e in pd.unique(meta["epoch"]))
    for epoch in epochs:
        mask = (meta["epoch"] == epoch).to_numpy()
        rows = [[_tsv_cell(v) for v in row] for row in meta.loc[mask, list(PROJECTOR_COLUMNS)].itertuples(index=False)]
        matrix = vectors[mask]
        if anchor_vectors is not None:
            rows += [[str(epoch), ANCHOR_LAYER, "", _tsv_cell(word), "", "", ""] for word in anchors["concept"]]
            matrix = np.concatenate([matrix, anchor_vectors], axis=0)
        subdir = Path(f"{epoch:05d}") / PROJECTOR_TENSOR
        (run_dir / subdir).mkdir(parents=True)
        np.savetxt(run_dir / subdir / "tensors.tsv", matrix, fmt="%.6g", delimiter="\t")
        lines = ["\t".join(PROJECTOR_COLUMNS), *("\t".join(r) for r in rows)]
        (run_dir / subdir / "metadata.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        info = config.embeddings.add()
        info.tensor_name = f"{PROJECTOR_TENSOR}:{epoch:05d}"
        info.tensor_path = str(subdir / "tensors.tsv")
        info.metadata_path = str(subdir / "metadata.tsv")
        info.tensor_shape.extend(matrix.shape)
    (run_dir / "projector_config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
    return len(epochs)


def _run_folder_name(out: Path) -> str:
    try:
        run = store.read_manifest(out).get("run")
    except store.StoreError:
        run = None
    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", str(run or Path(out).resolve().name)).strip("._")
    return name or "run"


def _replace_folder(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``; the old export is removed only once the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{staging.name[-8:]}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_tensorboard(out: str | Path, logdir: str | Path, *, log: Callable[[str], None] = print) -> Path:
    """Write the run in ``out`` as the TensorBoard run ``LOGDIR/<run>/``, replacing an earlier export.

    Scalars: :func:`scalar_table`, step = epoch. Projector: per epoch, the neurons'
    concept embeddings (plus anchor words, layer ``(anchor)``) with the metadata columns
    :data:`PROJECTOR_COLUMNS`. Returns the run folder. ``conceptmon watch`` calls this
    after each refresh to keep a TensorBoard current.
    """
    SummaryWriter = _summary_writer()
    out, logdir = Path(out), Path(logdir)
    if logdir.exists() and not logdir.is_dir():
        raise ExportError(f"--logdir {logdir}: is a file, not a folder")
    tables, dissect, neurons, vectors, anchors = _read_results(out, log)
    target = logdir / _run_folder_name(out)
    if target.exists() and not (target / EXPORT_MARKER).exists():
        raise ExportError(f"{target}: exists and was not written by conceptmon export; "
                          f"choose another --logdir or remove it")
    logdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=logdir))
    try:
        scalars = scalar_table(tables)
        writer = SummaryWriter(log_dir=str(staging))
        try:
            for epoch, tag, value in scalars.itertuples(index=False):
                writer.add_scalar(tag, float(value), global_step=int(epoch))
        finally:
            writer.close()
        n_tensors = 0
        if neurons is not None and len(neurons):
            n_tensors = _write_projector(staging, neurons, vectors, dissect, anchors)
        epochs = sorted(int(e) for e in pd.unique(scalars["epoch"]))
        (staging / EXPORT_MARKER).write_text(json.dumps({"out": str(out.resolve()), "epochs": epochs}) + "\n")
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote TensorBoard run {target}: {scalars['tag'].nunique()} scalars over {len(epochs)} epochs"
        + (f", {n_tensors} projector tensors" if n_tensors else ""))
    return target


__all__ = [
    "ExportError", "KEYED_SCALARS", "LAYER_SCALARS", "PROJECTOR_COLUMNS", "dead_counts", "export_tensorboard",
    "observation_scalars", "projector_rows", "scalar_table",
]
