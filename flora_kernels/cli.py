"""``python -m flora_kernels info``: versions, device and which backends are usable (with the
reason for each one that is not). The benchmark CLI, ``flora-bench``, lives in the separate
``flora_bench`` package (installed by the same distribution)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from . import __version__


def dist_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (None: not installed)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info_text() -> str:
    """Versions, device and backends, as ``python -m flora_kernels info`` prints them."""
    from .backends import available_backends

    lines = [
        f"flora_kernels {__version__}",
        f"python {platform.python_version()} ({platform.platform()})",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda}), threads {torch.get_num_threads()}",
        f"triton {dist_version('triton') or 'not installed'}; peft {dist_version('peft') or 'not installed'}",
        f"cpu: {cpu_model()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            pr = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {pr.name}, capability {pr.major}.{pr.minor}, {pr.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("cuda: not available")
    lines.append("backends:")
    for name, status in available_backends().items():
        lines.append(f"  {name:<10} {status}")

    env = {k: os.environ[k] for k in ("FLORA_BACKEND", "TRITON_INTERPRET", "FLORA_SKIP_EXT") if k in os.environ}
    if env:
        lines.append("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flora_kernels info``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m flora_kernels info\n  info   versions, device, available backends\n"
            "(the benchmark: flora-bench, or python -m flora_bench)"
        )
        return 0
    if argv[0] == "info":
        print(info_text())
        return 0
    print(f"python -m flora_kernels: unknown command {argv[0]!r}: expected 'info' "
          "(the benchmark is flora-bench, or python -m flora_bench)", file=sys.stderr)
    return 1
