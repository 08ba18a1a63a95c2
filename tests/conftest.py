import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The repository's own data root (benchmarks, GSM8K train), whatever $NRR_DATA_ROOT says."""
    from recipes.data.catalog import REPOSITORY_DATA_ROOT

    return REPOSITORY_DATA_ROOT
