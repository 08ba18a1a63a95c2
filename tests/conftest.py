import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(ROOT))


# `make test` runs the suite on two pytest-xdist workers, one test module at a time each. Modules in one group here
# go to the same worker: they share a session fixture that launches the runs of every module that uses it.
SAME_WORKER = {"megatron_workers": ("test_lora.py", "test_megatron_distopt.py", "test_megatron_memory_modes.py",
                                    "test_megatron_parallel.py", "test_planner.py", "test_topk_distillation.py")}


@pytest.hookimpl(optionalhook=True)  # a plain `pytest` without pytest-xdist never calls it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return next((group for group, names in SAME_WORKER.items() if Path(module).name in names), module)

    return ModuleScopes(config, log)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The repository's own data root (benchmarks, GSM8K train), whatever $NRR_DATA_ROOT says."""
    from recipes.data.catalog import REPOSITORY_DATA_ROOT

    return REPOSITORY_DATA_ROOT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny student as the distillation stage ships it: tiny-qwen2 with seed-0 random weights, a Megatron
    checkpoint exported with `nrr convert to-hf` (each CLI call in its own process)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    base = tmp_path_factory.mktemp("tiny-qwen2")
    nrr = [sys.executable, "-m", "recipes.cli", "convert"]
    subprocess.run([*nrr, "init", "--config", str(root / "recipes/assets/models/tiny-qwen2/config.json"),
                    "--out", str(base / "ckpt"), "--seed", "0"], check=True, cwd=root, capture_output=True)
    subprocess.run([*nrr, "to-hf", "--ckpt", str(base / "ckpt"), "--out", str(base / "hf")], check=True, cwd=root,
                   capture_output=True)
    return base / "hf"


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, Path]:
    """Family-shaped tiny HF checkpoints (tests/families/build.py): qwen2.5, qwen3, llama3.1, r1-distill."""
    from tests.families.build import FAMILIES, build_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}



@pytest.fixture(scope="session")
def megatron_workers(request, tmp_path_factory) -> dict[str, Path]:
    """The folder each test module's megatron worker runs (its WORKER_RUNS) wrote to, {module name: folder}: the
    runs of every module selected for this session share one launch per world size (tests/megatron_scripts/
    run_many.py)."""
    from tests.megatron_scripts.run_many import launch

    modules = {item.module.__name__: item.module for item in request.session.items
               if "megatron_workers" in item.fixturenames}
    return launch({name: module.WORKER_RUNS for name, module in modules.items()}, tmp_path_factory.mktemp("megatron"))
