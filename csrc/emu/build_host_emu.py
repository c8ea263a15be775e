"""Build a host (CPU) emulation of csrc/flora_cuda.cu as a shared library, for tests without a GPU.

    python csrc/emu/build_host_emu.py OUT_DIR   -> OUT_DIR/libflora_cuda_emu.so (prints its path)

Rewrites every ``kernel<<<grid, block, smem, stream>>>(args)`` launch into
``emu::launch(grid, block, smem, [&] { kernel(args); })`` and the dynamic shared-memory
declaration into a host buffer, then compiles it with the host C++ compiler and FLORA_HOST_EMU
defined (the mma.sync instructions become the emulation in cuda_host_emu.h) against the CUDA
toolkit headers (cuda_runtime_api.h, cuda_fp16.h, cuda_bf16.h; no libcudart, no GPU).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        cur += ch
    parts.append(cur.strip())
    return parts


def transform(src: str) -> str:
    src = src.replace(
        "extern __shared__ __align__(16) unsigned char smem_raw[];", "unsigned char* smem_raw = emu::dyn_smem;"
    )
    pat = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.DOTALL)
    out, i = [], 0
    while m := pat.search(src, i):
        out.append(src[i:m.start()])
        depth, j = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            j += 1
        cfg = _split_top(m.group(2))
        smem = cfg[2] if len(cfg) > 2 else "0"
        out.append(f"emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), {smem}, [&]() {{ {m.group(1)}({src[m.end():j - 1]}); }})")
        i = j
    out.append(src[i:])
    return '#include "cuda_host_emu.h"\n' + "".join(out)


def cuda_include() -> Path | None:
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
    cands += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").exists():
            return Path(c) / "include"
    return None


def build(out_dir: Path) -> Path:
    inc = cuda_include()
    if inc is None:
        raise RuntimeError("CUDA toolkit headers (cuda_fp16.h) not found; set CUDA_HOME")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "flora_cuda_emu.cpp").write_text(transform((CSRC / "flora_cuda.cu").read_text()))
    lib = out_dir / "libflora_cuda_emu.so"
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-fPIC", "-shared", "-w", "-DFLORA_HOST_EMU", f"-I{inc}", f"-I{CSRC}",
           f"-I{HERE}", f"-I{out_dir}", str(HERE / "harness.cpp"), "-o", str(lib), "-lpthread"]
    subprocess.run(cmd, check=True)
    return lib


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "build/cuda_emu")))
