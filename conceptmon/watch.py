"""Follow a training run: dissect each checkpoint as it appears, refresh the outputs.

A checkpoint is taken only once it is *settled*: seen with the same size and mtime on
two consecutive polls and readable. Then:

* a file still being written (truncated, unreadable) is skipped with a notice and tried
  again on the next poll; the notice is said once per state of the file;
* a file that can never work as it is (wrong architecture, no weights, no epoch, NaN
  activations) is reported once and left alone until it changes;
* a second file for an epoch another file already holds is an error for that epoch,
  named once; neither file's results are replaced;
* a file that changes after it was dissected (new weights under the same name) is
  dissected again once it settles.

Nothing that goes wrong with one file stops the watcher.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import store
from .checkpoints import CheckpointError, CheckpointFile, UnreadableCheckpoint, checkpoint_files, read_epoch
from .config import Config
from .engine import Dissector, resolve_ckpt_dir
from .errors import ConceptmonError

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


def refresh_outputs(out: Path, log: Callable[[str], None], tensorboard: Path | None = None) -> None:
    """Re-run embed, stats and report (and the TensorBoard export) so the folder always
    shows the latest epoch; a failing step is reported and the others still run."""
    from .embedding import embed_like_before
    from .report import report_run
    from .stats import stats_run

    quiet = lambda m: None  # noqa: E731
    steps = [("embed", lambda: embed_like_before(out, log=quiet)),  # keeps the user's anchors and encoder
             ("stats", lambda: stats_run(out, log=quiet)),
             ("report", lambda: report_run(out, log=quiet))]
    if tensorboard is not None:
        from .export import export_tensorboard

        steps.append(("tensorboard", lambda: export_tensorboard(out, tensorboard, log=quiet)))
    for name, step in steps:
        try:
            step()
        except Exception as e:  # a refresh failure must not stop the monitoring
            log(f"notice: {name} refresh failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


@dataclass
class _Seen:
    """What the watcher knows of one file: its last (size, mtime), and what became of that state."""

    signature: tuple[int, int] | None = None
    state: str = "new"  # new | settling | done | waiting | failed
    said: str = ""


class Watcher:
    """One poll at a time over a checkpoint folder (see the module docstring)."""

    def __init__(self, dissector: Dissector, ckpt_dir: Path, *, trust: bool, log: Callable[[str], None]):
        self.dissector = dissector
        self.ckpt_dir = Path(ckpt_dir)
        self.trust = trust
        self.log = log
        self.files: dict[Path, _Seen] = {}
        self.owner: dict[int, Path] = {}  # epoch -> the file that holds it

    def _say_once(self, seen: _Seen, message: str) -> None:
        if seen.said != message:
            seen.said = message
            self.log(message)

    def poll(self) -> list[int]:
        """Look at the folder once; returns the epochs dissected in this poll."""
        try:
            paths = checkpoint_files(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        except CheckpointError as e:
            self.log(f"notice: {e}")
            return []
        for gone in set(self.owner.values()) - set(paths):  # a removed file frees its epoch
            self.owner = {e: p for e, p in self.owner.items() if p != gone}
        dissected = []
        for path in paths:
            seen = self.files.setdefault(path, _Seen())
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            signature = (st.st_size, st.st_mtime_ns)
            if signature != seen.signature:  # new, still changing, or changed after we saw it
                seen.signature, seen.state = signature, "settling"
                continue
            if seen.state in ("done", "failed"):
                continue
            epoch = self._dissect(path, seen)
            if epoch is not None:
                dissected.append(epoch)
        return dissected

    def _dissect(self, path: Path, seen: _Seen) -> int | None:
        try:
            epoch = read_epoch(path, self.trust)
        except CheckpointError as e:
            return self._trouble(path, seen, e)
        owner = self.owner.get(epoch)
        if owner is not None and owner != path and owner.exists():
            seen.state = "failed"
            self._say_once(seen, f"error: {path.name} and {owner.name} both hold epoch {epoch}; keeping the results "
                                 f"of {owner.name} (remove one of them)")
            return None
        try:
            done = self.dissector.dissect_file(CheckpointFile(path, epoch), self.trust)
        except ConceptmonError as e:
            return self._trouble(path, seen, e)
        self.owner[epoch] = path
        seen.state, seen.said = "done", ""
        return epoch if done else None

    def _trouble(self, path: Path, seen: _Seen, error: Exception) -> None:
        text = str(error)
        if isinstance(error, UnreadableCheckpoint):  # still being written, perhaps
            seen.state = "waiting"
            seen.signature = None  # look again next poll, once it has settled
            self._say_once(seen, f"notice: skipping {path.name} for now ({text}); will retry")
        else:
            seen.state = "failed"
            self._say_once(seen, f"error: skipping {path.name} until it changes: {text}")
        return None


def watch_run(
    cfg: Config,
    *,
    ckpts: str | Path | None = None,
    out: str | Path | None = None,
    interval: float = 30.0,
    patience: int = 3,
    refresh: bool = True,
    tensorboard: str | Path | None = None,
    trust_checkpoints: bool = False,
    max_polls: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Poll ``ckpts`` until interrupted (or ``max_polls``); returns the epochs dissected."""
    if not interval > 0:
        raise ConceptmonError(f"--interval: must be a positive number of seconds, got {interval:g}")
    ckpt_dir = resolve_ckpt_dir(cfg, ckpts)
    dissector = Dissector(cfg, out, checkpoints=ckpt_dir, log=lambda m: None)
    watcher = Watcher(dissector, ckpt_dir, trust=trust_checkpoints, log=log)
    tracker = CollapseTracker(patience=patience)
    done: list[int] = []
    polls = 0
    log(f"watching {ckpt_dir} every {interval:g}s (Ctrl-C stops)")
    try:
        while not should_stop():
            new_epochs = watcher.poll()
            for epoch in sorted(new_epochs):
                table = store.read_table(store.dissect_path(dissector.out, epoch), store.DISSECT)
                summary = store.read_json(store.epoch_record_path(dissector.out, epoch))["layers"]
                parts = [f"{layer} {s['interpretable']}/{s['neurons']} interpretable, {s['concepts']} concepts"
                         + (f", {s['dead']} dead" if s.get("dead") else "") for layer, s in summary.items()]
                log(f"epoch {epoch}: " + "; ".join(parts))
                for warning in tracker.update(summary, top_concept_share(table)):
                    log(warning)
                done.append(epoch)
            if new_epochs and refresh:
                refresh_outputs(dissector.out, log, Path(tensorboard) if tensorboard else None)
            polls += 1
            if max_polls is not None and polls >= max_polls:
                break
            sleep(interval)
    except KeyboardInterrupt:
        log("stopped")
    return done
