"""The curation pipeline: a NeMo Curator `Pipeline` of one stage per concern, and how a run is set up.

    read -> generate -> parse -> filter_* -> dedup_exact -> dedup_fuzzy -> decontam -> select -> write -> report

The reader emits the whole problem set as one `DocumentBatch`, so the global stages (dedup,
selection) see every record. A run gets its own Ray temp dir and an environment marker; Ray
processes that outlive the run are found by that marker and stopped. With `embedded_teacher`, the
teacher server runs as a child process for the length of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from curator_pipelines.config import CurateConfig
from recipes.config import ConfigError
from recipes.data import catalog

RUN_MARKER = "NRR_CURATE_RUN"
DRIVER_MARKER = "NRR_CURATE_DRIVER"  # the pid of the run's driver: its processes are orphans once it is gone
RESULTS_FILE = "generations.jsonl"
QUARANTINE_FILE = "quarantine.jsonl"


# ------------------------------------------------------------------ set-up


def resolve_paths(cfg: CurateConfig, root: Path | None = None) -> CurateConfig:
    """Absolute paths (Ray workers do not share the driver's working directory)."""
    root = root or Path.cwd()

    def absolute(p: str | None) -> str | None:
        return None if p is None else str((root / p).resolve())

    cfg = dataclasses.replace(cfg, data_root=absolute(cfg.data_root))
    path = absolute(cfg.input.path)
    if cfg.input.dataset:
        named = str(catalog.path_of(cfg.input.dataset, cfg.data_root).resolve())
        if path not in (None, named):  # a resolved config (its saved copy) holds both, naming one file
            raise ConfigError(f"input: set one of `path` and `dataset`, not both (path={cfg.input.path!r}, "
                              f"dataset={cfg.input.dataset!r}); to read a file instead, add input.dataset=null")
        path = named
    elif path is None:
        raise ConfigError("input: set `path` (a .jsonl / .parquet file or a datasets folder) or `dataset` "
                          "(a name from `nrr data list`)")
    cfg.input = dataclasses.replace(cfg.input, path=path)
    cfg.output = dataclasses.replace(cfg.output, dir=absolute(cfg.output.dir))
    cfg.decontam = dataclasses.replace(cfg.decontam, benchmark_paths=[absolute(p) for p in cfg.decontam.benchmark_paths])
    cfg.generation = dataclasses.replace(cfg.generation, teacher_config=absolute(cfg.generation.teacher_config))
    return cfg


def write_embedded_problems(cfg: CurateConfig) -> int:
    """The embedded task's train problems (plus held-out ones at `contamination_rate`) as JSONL."""
    from recipes import task

    ep = cfg.embedded_problems
    problems = task.train_problems(ep.levels, ep.n_per_level, seed=ep.seed)
    rng = random.Random(f"contaminate:{ep.seed}")
    n_swap = round(len(problems) * ep.contamination_rate)
    if n_swap:
        levels = ep.levels + ep.extra_heldout_levels
        pool = task.heldout_problems(levels, max(1, n_swap // len(levels) + 1))
        rng.shuffle(pool)
        for pos, held in zip(rng.sample(range(len(problems)), n_swap), pool):
            problems[pos] = held
    path = Path(cfg.input.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_dict()) + "\n")
    tmp.replace(path)
    return len(problems)


@contextlib.contextmanager
def embedded_teacher(cfg: CurateConfig, log_path: Path, startup_s: float = 60.0):
    """Start `nrr teacher serve` on a free port; yield its base URL; stop it."""
    g = cfg.generation
    cmd = [sys.executable, "-m", "recipes.cli", "teacher", "serve", "--config", g.teacher_config,
           "--parent-pid", str(os.getpid()), *g.teacher_overrides, "port=0", f"log_path={log_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    try:
        deadline = time.monotonic() + startup_s
        url = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                url = line.strip().rsplit(" ", 1)[-1]
                break
        if url is None:
            raise RuntimeError(f"the embedded teacher did not start (exit code {proc.poll()}): {' '.join(cmd)}")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _run_processes() -> dict[int, dict[str, str]]:
    """pid -> the curation markers in its environment, for every process a curation run started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        marks = {}
        for item in env:
            key, _, value = item.partition(b"=")
            if key in (RUN_MARKER.encode(), DRIVER_MARKER.encode(), b"RAY_TMPDIR"):
                marks[key.decode()] = value.decode(errors="replace")
        if RUN_MARKER in marks:
            found[int(entry.name)] = marks
    return found


def _marked_processes(marker: str) -> list[int]:
    return [pid for pid, m in _run_processes().items() if m[RUN_MARKER] == marker]


RAY_DIR_PREFIX = "nrr-ray-"


def stop_orphans(stale_after_s: float = 600.0) -> int:
    """Stop what earlier runs left behind when their driver was killed (Ray's raylet, workers), and
    remove their Ray temp dirs once no process uses them (after a while: a run may be starting)."""
    stopped = 0
    processes = _run_processes()
    for pid, marks in processes.items():
        driver = int(marks.get(DRIVER_MARKER, "0") or 0)
        if driver and not Path(f"/proc/{driver}").exists():
            stopped += stop_marked_processes(marks[RUN_MARKER])
    in_use = {m.get("RAY_TMPDIR") for m in _run_processes().values()}
    for d in Path("/tmp").glob(f"{RAY_DIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            if str(d) not in in_use and time.time() - d.stat().st_mtime > stale_after_s:
                shutil.rmtree(d, ignore_errors=True)
    return stopped


def stop_marked_processes(marker: str, grace_s: float = 3.0) -> int:
    """Stop the processes this run started that are still alive (Ray workers, raylet, ...)."""
    pids = _marked_processes(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _marked_processes(marker):
        time.sleep(0.2)
    for pid in _marked_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


@contextlib.contextmanager
def ray_session(cfg: CurateConfig):
    """Ray in its own temp dir, every process it starts marked; leftovers stopped afterwards."""
    stop_orphans()
    marker = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix=RAY_DIR_PREFIX, dir="/tmp")  # short: Ray's socket paths have a length limit
    saved = {k: os.environ.get(k) for k in (RUN_MARKER, DRIVER_MARKER, "RAY_TMPDIR")}
    os.environ[RUN_MARKER] = marker
    os.environ[DRIVER_MARKER] = str(os.getpid())
    os.environ["RAY_TMPDIR"] = tmp
    try:
        if cfg.executor.name == "ray_data":
            import ray

            # Ray Data needs no dashboard; the executor's own ray.init then reuses this one
            ray.init(include_dashboard=False, num_cpus=cfg.executor.num_cpus, _temp_dir=tmp,
                     log_to_driver=False, configure_logging=False)
        yield
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        stop_marked_processes(marker)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ the pipeline


def build_pipeline(cfg: CurateConfig, show_progress: bool = True):
    from nemo_curator.pipeline import Pipeline

    from curator_pipelines.decontam import DecontamStage
    from curator_pipelines.dedup import dedup_stages
    from curator_pipelines.filters import ParseStage, filter_stages
    from curator_pipelines.generate import GenerateStage
    from curator_pipelines.read import ReadProblemsStage
    from curator_pipelines.report import ReportStage
    from curator_pipelines.select import SelectStage
    from curator_pipelines.write import WriteStage

    out = Path(cfg.output.dir)
    stages = [
        ReadProblemsStage(cfg.input, str(out / QUARANTINE_FILE)),
        GenerateStage(cfg.generation, str(out / RESULTS_FILE), show_progress),
        ParseStage(),
        *filter_stages(cfg.filters),
        *dedup_stages(cfg.dedup),
        *([DecontamStage(cfg.decontam, cfg.data_root)] if cfg.decontam.enabled else []),
        SelectStage(cfg.select),
        WriteStage(str(out), cfg.output.jsonl, cfg.output.parquet),
        ReportStage(str(out), cfg.name, cfg.output.histograms),
    ]
    return Pipeline(name=f"nrr-curate-{cfg.name}", description="long chain-of-thought curation", stages=stages)


def make_executor(cfg: CurateConfig):
    if cfg.executor.name == "xenna":
        from nemo_curator.backends.xenna import XennaExecutor

        return XennaExecutor(config={"execution_mode": "batch"})
    from nemo_curator.backends.ray_data import RayDataExecutor

    return RayDataExecutor()


def run_curation(cfg: CurateConfig, show_progress: bool = True) -> dict:
    """Run the whole curation; returns the report (also written to `output.dir`)."""
    from recipes.config import save_config

    cfg = resolve_paths(cfg)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.embedded_problems.enabled:
        write_embedded_problems(cfg)
    # a malformed input fails here, in seconds, before Ray and the teacher start (the read stage reads it again)
    from curator_pipelines.read import read_problems

    problems, _ = read_problems(cfg.input)
    if cfg.generation.source == "endpoint":
        from curator_pipelines.generate import api_key

        api_key(cfg.generation)  # the named env var must be set (its value stays in memory only)
    with contextlib.ExitStack() as stack:
        if cfg.generation.source == "endpoint" and cfg.generation.embedded_teacher:
            url = stack.enter_context(embedded_teacher(cfg, out / "teacher_log.jsonl"))
            cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, base_url=url))
        stack.enter_context(ray_session(cfg))
        started = time.perf_counter()
        if cfg.generation.source == "endpoint":
            from curator_pipelines.generate import watch_progress

            total = len(problems) * cfg.generation.n_samples
            stack.enter_context(watch_progress(out / RESULTS_FILE, total, show_progress and sys.stderr.isatty()))
        build_pipeline(cfg, show_progress).run(make_executor(cfg))
        seconds = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["pipeline_seconds"] = round(seconds, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def root_cause(err: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (a bad record, a generation error)."""
    import re

    from curator_pipelines.generate import GenerationError
    from curator_pipelines.read import BadRecordError

    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (BadRecordError, GenerationError)) and not hasattr(e, "cause"):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    # Ray may hand back only the remote traceback as text: take the error line from it
    for cls in (BadRecordError, GenerationError):
        found = re.findall(rf"{cls.__module__}\.{cls.__name__}: (.+)", str(err))
        if found:
            return cls(found[-1].strip())
    return err
