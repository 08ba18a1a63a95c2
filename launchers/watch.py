"""Live progress of launched stages: one line that updates while NeMo-Run runs the jobs, and each stage's time.

Every stage's progress bar (recipes.metrics.progress) keeps `<stage_dir>/.nrr_stage/progress.json` current when
the launcher sets $NRR_PROGRESS_FILE; `StageWatcher` polls those files and the stages' status markers from the
launching process and shows, for the stages running now: step / total, the bar's own figures (loss or reward,
tokens/s), elapsed and ETA, with the pipeline's elapsed time. The files live on the filesystem the jobs write, so
a Slurm run is watched the same way wherever the run directory is visible.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from launchers.entry import MARKER_DIR, stage_state

PROGRESS_FILE = "progress.json"


def progress_path(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / MARKER_DIR / PROGRESS_FILE


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class StageTimes:
    """When a stage could start (what it waits for had ended) and when the watcher saw its status marker."""
    started: float | None = None
    ended: float | None = None
    state: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started


@dataclass
class StageWatcher:
    """Polls every `interval` seconds in a daemon thread; `line()` is what the terminal shows now."""
    stages: dict[str, str]  # stage name -> stage_dir
    started_by: dict[str, list[str]] = field(default_factory=dict)  # stage -> upstream stages (it starts after)
    interval: float = 0.5
    times: dict[str, StageTimes] = field(default_factory=dict)

    def __post_init__(self):
        self.t0 = time.time()
        self.times = {name: StageTimes() for name in self.stages}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None
        self.key = None

    def poll(self, now: float | None = None) -> None:
        """A stage starts when every stage it waits for has ended (at the watcher's start when it waits for none)
        and ends when its status marker appears."""
        now = time.time() if now is None else now
        for name, stage_dir in self.stages.items():
            t = self.times[name]
            upstream = [self.times[u] for u in self.started_by.get(name, []) if u in self.times]
            if t.started is None and all(u.ended is not None for u in upstream):
                t.started = max([u.ended for u in upstream], default=self.t0)
            if t.ended is None and t.started is not None:
                state = stage_state(stage_dir)
                if state is not None:
                    t.ended, t.state = now, state

    def line(self, now: float | None = None) -> str:
        from recipes.metrics import read_heartbeat

        now = time.time() if now is None else now
        parts = []
        for name, stage_dir in self.stages.items():
            t = self.times[name]
            if t.started is None or t.ended is not None:
                continue
            beat = read_heartbeat(progress_path(stage_dir))
            if beat is None or not beat.get("total"):
                parts.append(f"{name} {clock(now - t.started)}")
                continue
            done, total = beat["completed"], beat["total"]
            info = f" {beat['info']}" if beat.get("info") else ""
            parts.append(f"{name} {beat.get('task', '')} {done:g}/{total:g} ({done / total:.0%}){info} "
                         f"{clock(beat.get('elapsed_s'))} ETA {clock(beat.get('eta_s'))}")
        ended = sum(t.ended is not None for t in self.times.values())
        self.key = (ended, tuple(p.split(" ")[0] for p in parts))  # what changes when a stage starts or ends
        head = f"[{ended}/{len(self.stages)} done {clock(now - self.t0)}]"
        return " | ".join([head, *parts]) if parts else f"{head} waiting"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()
            if isinstance(self._live, _PlainLines):
                self._live.update(self.line(), self.key)
            elif self._live is not None:
                self._live.update(self.line())

    def __enter__(self):
        import sys

        from rich.console import Console
        from rich.live import Live

        console = Console(file=sys.stderr)
        if console.is_terminal:
            self._live = Live(self.line(), console=console, refresh_per_second=2, transient=True,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.__enter__()
        else:  # a log file: one line per stage start/end is readable, a redrawn line is not
            self._live = _PlainLines(sys.stderr)
        self._thread = threading.Thread(target=self._loop, name="nrr-stage-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()
        if isinstance(self._live, _PlainLines):
            self._live.update(self.line(), self.key)
        elif self._live is not None:
            self._live.__exit__(None, None, None)


class _PlainLines:
    """Without a terminal: print the watcher's line when a stage starts or ends, and once a minute."""

    def __init__(self, file, every: float = 60.0):
        self.file, self.every = file, every
        self._last, self._key = 0.0, None

    def update(self, text: str, key) -> None:
        now = time.time()
        if key != self._key or now - self._last >= self.every:
            print(text, file=self.file, flush=True)
            self._key, self._last = key, now
