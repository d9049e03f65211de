"""Follow a training run: dissect each checkpoint as it appears, refresh the outputs.

A checkpoint is taken only once it is *settled*: seen with the same size and mtime on
two consecutive polls and readable. A file still being written (or truncated) is
skipped with a notice and tried again on the next poll.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import store
from .checkpoints import CheckpointError, CheckpointFile, checkpoint_files, read_epoch
from .config import Config
from .engine import Dissector, resolve_ckpt_dir


@dataclass
class CollapseTracker:
    """Warns when a layer's concept diversity falls, or its neurons crowd onto few concepts,
    for ``patience`` consecutive epochs."""

    patience: int = 3
    crowd_share: float = 0.5
    history: dict = field(default_factory=dict)  # layer -> [(distinct, top share)]

    def update(self, summary: dict, top_share: dict[str, float]) -> list[str]:
        warnings = []
        for layer, s in summary.items():
            hist = self.history.setdefault(layer, [])
            hist.append((s["concepts"], top_share.get(layer, 0.0)))
            recent = hist[-(self.patience + 1):]
            if len(recent) == self.patience + 1 and all(b[0] < a[0] for a, b in zip(recent, recent[1:])):
                warnings.append(
                    f"warning: {layer}: distinct concepts fell for {self.patience} epochs "
                    f"({' -> '.join(str(r[0]) for r in recent)})"
                )
            crowded = hist[-self.patience:]
            if len(crowded) == self.patience and all(c[1] > self.crowd_share for c in crowded):
                warnings.append(
                    f"warning: {layer}: over {self.crowd_share:.0%} of interpretable neurons share one concept "
                    f"for {self.patience} epochs (collapse?)"
                )
        return warnings


def top_concept_share(table) -> dict[str, float]:
    """Per layer, the share of interpretable neurons whose top-1 concept is the most common one."""
    best = table[(table["rank"] == 0) & table["interpretable"]]
    shares = {}
    for layer, group in best.groupby("layer"):
        shares[layer] = float(group.concept.value_counts().iloc[0] / len(group)) if len(group) else 0.0
    return shares


def refresh_outputs(out: Path, log: Callable[[str], None]) -> None:
    """Re-run embed, stats and report so the folder always shows the latest epoch."""
    steps = []
    try:
        from .embedding import embed_like_before

        # Keeps the anchors and encoder the user last embedded with.
        steps.append(("embed", lambda: embed_like_before(out, log=lambda m: None)))
    except ImportError:
        pass
    try:
        from .stats import stats_run

        steps.append(("stats", lambda: stats_run(out, log=lambda m: None)))
    except ImportError:
        pass
    try:
        from .report import report_run

        steps.append(("report", lambda: report_run(out, log=lambda m: None)))
    except ImportError:
        pass
    for name, step in steps:
        try:
            step()
        except Exception as e:  # a refresh failure must not stop the monitoring
            log(f"notice: {name} refresh failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def watch_run(
    cfg: Config,
    *,
    ckpts: str | Path | None = None,
    out: str | Path | None = None,
    interval: float = 30.0,
    patience: int = 3,
    refresh: bool = True,
    trust_checkpoints: bool = False,
    max_polls: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Poll ``ckpts`` until interrupted (or ``max_polls``); returns the epochs dissected."""
    ckpt_dir = resolve_ckpt_dir(cfg, ckpts)
    dissector = Dissector(cfg, out, checkpoints=ckpt_dir, log=lambda m: None)
    tracker = CollapseTracker(patience=patience)
    seen: dict[Path, tuple[int, int]] = {}
    handled: set[Path] = set()
    done: list[int] = []
    polls = 0
    log(f"watching {ckpt_dir} every {interval:g}s (Ctrl-C stops)")
    try:
        while not should_stop():
            new_epochs = []
            files = checkpoint_files(ckpt_dir) if Path(ckpt_dir).is_dir() else []
            for path in files:
                if path in handled:
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                if seen.get(path) != sig:  # new or still changing: look again next poll
                    seen[path] = sig
                    continue
                try:
                    ckpt = CheckpointFile(path, read_epoch(path, trust_checkpoints))
                    dissected = dissector.dissect_file(ckpt, trust_checkpoints)
                except CheckpointError as e:
                    log(f"notice: skipping {path.name} for now ({e}); will retry")
                    seen.pop(path, None)
                    continue
                handled.add(path)
                if dissected:
                    new_epochs.append(ckpt.epoch)
            for epoch in sorted(new_epochs):
                table = store.read_table(store.dissect_path(dissector.out, epoch), store.DISSECT)
                summary = store.read_json(store.epoch_record_path(dissector.out, epoch))["layers"]
                parts = [f"{layer} {s['interpretable']}/{s['neurons']} interpretable, {s['concepts']} concepts"
                         for layer, s in summary.items()]
                log(f"epoch {epoch}: " + "; ".join(parts))
                for warning in tracker.update(summary, top_concept_share(table)):
                    log(warning)
                done.append(epoch)
            if new_epochs and refresh:
                refresh_outputs(dissector.out, log)
            polls += 1
            if max_polls is not None and polls >= max_polls:
                break
            sleep(interval)
    except KeyboardInterrupt:
        log("stopped")
    return done
