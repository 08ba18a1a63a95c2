"""Clean-up after a test kills a job, as a scheduler would."""

import os
import signal
from pathlib import Path


def kill_job(marker: str) -> None:
    """SIGKILL every process whose environment carries NRR_TEST_JOB=marker: torchrun gives each rank a session of
    its own, and a rank that dies leaves megatron's checkpoint-writer processes (they ignore SIGTERM) behind."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"NRR_TEST_JOB={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone, or not ours to read
            pass
