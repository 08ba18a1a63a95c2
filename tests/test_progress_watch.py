"""Live progress: a stage's progress bar keeps a heartbeat file current; the launcher's watcher turns the heartbeats
and status markers into one line and each stage's wall time."""

from __future__ import annotations

import json

from launchers.entry import marker
from launchers.watch import StageWatcher, clock, progress_path
from recipes.metrics import PROGRESS_FILE_ENV, progress, read_heartbeat


def test_the_bar_writes_its_state_for_rank_0_only(tmp_path, monkeypatch):
    beat = tmp_path / "beat.json"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(beat))
    monkeypatch.setenv("RANK", "1")
    with progress(disable=True) as bar:
        task = bar.add_task("sft", total=10, completed=0, info="")
        bar.update(task, completed=4, info="loss 2.5000")
    assert not beat.exists()  # only rank 0 writes

    monkeypatch.setenv("RANK", "0")
    with progress(disable=True) as bar:  # hidden bars (logging.progress=false) still report
        task = bar.add_task("sft", total=10, completed=2, info="")  # a resumed run starts at its step
        bar.update(task, completed=4, info="loss 2.5000")
        first = read_heartbeat(beat)
        bar.update(task, completed=5, info="loss 2.4000")  # within the interval: not rewritten ...
        assert read_heartbeat(beat) == first
        bar.update(task, completed=10, info="loss 2.0000")  # ... but the last step always is
    assert (first["task"], first["completed"], first["total"], first["info"]) == ("sft", 4, 10, "loss 2.5000")
    last = read_heartbeat(beat)
    assert (last["completed"], last["info"]) == (10, "loss 2.0000")
    assert last["eta_s"] == 0  # finished
    assert not beat.with_name(beat.name + ".tmp").exists()


def test_an_unwritable_heartbeat_never_stops_the_stage(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(blocker / "beat.json"))  # its folder is a file
    monkeypatch.delenv("RANK", raising=False)
    with progress(disable=True) as bar:
        task = bar.add_task("eval", total=3, completed=0, info="")
        bar.advance(task)
        bar.update(task, completed=3)
    assert read_heartbeat(blocker / "beat.json") is None


def test_watcher_times_stages_by_their_dependencies_and_shows_the_running_ones(tmp_path):
    dirs = {name: tmp_path / name for name in ("curate", "eval_base", "sft", "export")}
    deps = {"curate": [], "eval_base": [], "sft": ["curate"], "export": ["sft"]}
    watcher = StageWatcher({n: str(d) for n, d in dirs.items()}, deps)
    t0 = watcher.t0

    def finish(name, state="SUCCEEDED"):
        marker(dirs[name], state).parent.mkdir(parents=True, exist_ok=True)
        marker(dirs[name], state).write_text(json.dumps({"exit_code": 0}))

    watcher.poll(now=t0 + 1)
    assert watcher.line(now=t0 + 1).startswith("[0/4 done 0:00:01] | curate 0:00:01 | eval_base 0:00:01")
    finish("eval_base")
    watcher.poll(now=t0 + 100)
    finish("curate")
    watcher.poll(now=t0 + 170)
    progress_path(dirs["sft"]).parent.mkdir(parents=True)
    progress_path(dirs["sft"]).write_text(json.dumps(
        {"task": "sft", "completed": 30, "total": 120, "info": "loss 1.2500 lr 1.0e-03 900 tok/s",
         "elapsed_s": 61.0, "eta_s": 183.0}))
    watcher.poll(now=t0 + 235)
    assert watcher.line(now=t0 + 235) == ("[2/4 done 0:03:55] | sft sft 30/120 (25%) loss 1.2500 lr 1.0e-03 "
                                         "900 tok/s 0:01:01 ETA 0:03:03")
    finish("sft")
    watcher.poll(now=t0 + 700)
    finish("export", "FAILED")
    watcher.poll(now=t0 + 716)
    seconds = {n: t.seconds for n, t in watcher.times.items()}
    assert seconds == {"curate": 170, "eval_base": 100, "sft": 530, "export": 16}
    assert watcher.times["export"].state == "FAILED"
    assert watcher.line(now=t0 + 716) == "[4/4 done 0:11:56] waiting"
    assert clock(3725.4) == "1:02:05" and clock(None) == "–"
