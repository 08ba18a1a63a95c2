"""What a measurement ran on, in the words a figure needs: CPU model, cores, the matmul kernels it has (AVX-512
BF16, AMX), torch's build and threads, the GPU when there is one, and the commit of this checkout."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    import torch

    flags = cpu_flags()
    out = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "avx512_bf16": "avx512_bf16" in flags,
           "amx_bf16": "amx_bf16" in flags, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus"] = torch.cuda.device_count()
    return out


def machine_line(m: dict) -> str:
    """'2-core AMD EPYC 9R14 (AVX-512 BF16, no AMX), torch 2.13.0+cpu'."""
    kernels = ", ".join([("AVX-512 BF16" if m.get("avx512_bf16") else "no AVX-512 BF16"),
                         ("AMX" if m.get("amx_bf16") else "no AMX")])
    gpu = f", {m['gpus']}x {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cores']}-core {m['cpu']} ({kernels}){gpu}, torch {m['torch']}"


def commit(repo: str | Path = ".") -> str:
    """The checkout's commit, with '+changes' when the working tree differs from it; 'unknown' outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short=7", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
