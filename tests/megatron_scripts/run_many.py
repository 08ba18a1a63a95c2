"""Run several megatron worker scripts in one process group: each test module's worker runs, one launch per world
size for the whole test session instead of one launch per run (a launch costs every rank an import of torch,
megatron and transformers, and torchrun a rendezvous).

A test module declares its runs as `WORKER_RUNS = [(nproc, script, argv), ...]`, argv with `{work}` for the
module's own folder; the `megatron_workers` fixture (tests/conftest.py) collects the runs of the modules selected
for the session and calls `launch`: every 2-process run, in declaration order, under one torchrun, then every
1-process run in one process (so a 1-process run may read what a 2-process run wrote). Each worker's `main(argv)`
sets the layout it needs with `runtime.init_distributed` (which rebuilds megatron's groups when TP/PP change, and
re-seeds every time) and leaves the process group to this script.

Worker entry: `run_many.py PLAN.json` where PLAN is a list of [script, argv].
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def launch(runs: dict[str, list[tuple[int, str, list[str]]]], work: Path, timeout: int = 1200) -> dict[str, Path]:
    """Run every module's worker runs ({module: runs}); returns each module's folder. Raises with the workers'
    output tail when a launch fails."""
    folders = {module: work / module.rsplit(".", 1)[-1] for module in runs}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for nproc in (2, 1):
        plan = [[script, [arg.format(work=folders[module]) for arg in argv]]
                for module, module_runs in runs.items() for n, script, argv in module_runs if n == nproc]
        if not plan:
            continue
        plan_file = work / f"plan_{nproc}.json"
        plan_file.write_text(json.dumps(plan, indent=1))
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run(launcher + [str(Path(__file__).resolve()), str(plan_file)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker launch of {[p[0] for p in plan]} at nproc={nproc} failed "
                               f"({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return folders


def main(plan_file: str) -> None:
    sys.path.insert(0, str(HERE))
    from recipes.megatron import runtime

    try:
        for script, argv in json.loads(Path(plan_file).read_text()):
            runtime.print_rank0(f"run_many: {script} {' '.join(argv)}")
            importlib.import_module(script).main(argv)
    finally:
        runtime.destroy_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1])
