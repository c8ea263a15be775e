"""What a result was measured on: device, versions, git commit, date, machine load."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from flora_kernels import __version__
from flora_kernels.cli import cpu_model, dist_version


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def git_commit() -> dict[str, object] | None:
    """HEAD of the checkout the package lives in (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return {"commit": head.stdout.strip(), "dirty_files": len(dirty.stdout.splitlines())}
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def environment(device: torch.device | str) -> dict:
    """The metadata block of a result document."""
    device = torch.device(device)
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "flora_kernels": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": dist_version("triton"),
        "peft": dist_version("peft"),
        "numpy": dist_version("numpy"),
        "git": git_commit(),
        "env": {
            k: os.environ[k] for k in ("FLORA_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES") if k in os.environ
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["cuda_device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    return env
