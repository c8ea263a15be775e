"""compile_check: ptxas report parsing, the per-target limits and verdicts, and a small real run
(GPU compiler and ptxas, no GPU) of recorded benchmark launches in a subprocess without the
interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from triton_helpers import needs_triton

from tools import compile_check as cc

pytestmark = needs_triton

_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_gemm_ext_kernel' for 'sm_90a'
ptxas info    : Function properties for _gemm_ext_kernel
    1064 bytes stack frame, 1064 bytes spill stores, 1216 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1064 bytes cumulative stack size
"""


def test_parse_ptxas():
    assert cc.parse_ptxas(_LOG) == (255, 1064, 1216)
    assert cc.parse_ptxas("ptxas info : Used 40 registers\n 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == (40, 0, 0)
    with pytest.raises(ValueError, match="no register"):
        cc.parse_ptxas("garbage")


def test_limits_and_verdict():
    assert cc.smem_limit(90) == 227 * 1024 and cc.smem_limit(80) == 163 * 1024
    assert cc.verdict(0, 0, cc.smem_limit(90), 90) == "ok"
    assert cc.verdict(0, 0, cc.smem_limit(90) + 1, 90) == f"SMEM>{cc.smem_limit(90)}"
    assert cc.verdict(0, 4, 0, 80) == "SPILLS"
    assert cc.verdict(8, 8, 200 * 1024, 80) == f"SPILLS+SMEM>{cc.smem_limit(80)}"
    with pytest.raises(ValueError, match="arch: expected one of"):
        cc.smem_limit(70)


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a fresh cache: ptxas runs
    return env


_SPEC_SCRIPT = """
import json, torch
from tools import compile_check as cc
out = {}
for launch in cc.record("linear-dropout", torch.bfloat16):
    job = cc.Job(launch, launch.configs(90)[0], "bf16", 90)
    fn, sig, const, attrs, opts = cc._bind(job)
    names = fn.arg_names
    out[launch.name] = {"div16": sorted(names[i[0]] for i, a in attrs.items() if a),
                        "const": {names[i[0]]: str(v) for i, v in const.items()},
                        "configs90": len(launch.configs(90)), "configs80": len(launch.configs(80))}
print(json.dumps(out))
"""


def test_recorded_launches_carry_the_runtime_specialisation(tmp_path):
    """The Linear dropout step at the benchmark shape: every kernel is captured, pointers and the
    4096 / 8192 sizes are specialised as divisible by 16, unit strides as constants, and the
    GEMM gets the configs its pruning keeps per target."""
    r = subprocess.run([sys.executable, "-c", _SPEC_SCRIPT], check=False, capture_output=True, text=True, env=_env(tmp_path),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    launches = json.loads(r.stdout.strip().splitlines()[-1])
    kinds = sorted({name.split("[")[0] for name in launches})
    assert kinds == ["ds_db", "ds_db_finish", "gemm_ext", "project", "reduce"], kinds
    fwd = launches["gemm_ext[linear-dropout/linear_fwd.2]"]
    assert {"a_ptr", "b_ptr", "y_ptr", "M", "N", "K", "M_BUCKET"} <= set(fwd["div16"])
    assert fwd["const"]["sak"] == "1" and fwd["const"]["HAS_BIAS"] == "True" and fwd["const"]["DROPOUT"] == "False"
    dx = launches["gemm_ext[linear-dropout/linear_bwd.3]"]
    assert dx["const"]["DROPOUT"] == "True" and dx["const"]["sbn"] == "1" and "bits_ptr" in dx["div16"]
    assert fwd["configs90"] == 5 and fwd["configs80"] == 3


def test_compile_check_small_run(tmp_path):
    """A real run: the first config of each kernel of the Linear dropout step, fp16, sm_80."""
    cmd = [sys.executable, "-m", "tools.compile_check", "--arch", "80", "--dtypes", "fp16",
           "--scenarios", "linear-dropout", "--kernels", "project", "ds_db", "--jobs", "1"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    pat = re.compile(r"^(\S+)\[linear-dropout/\S+\] \S+ fp16 regs=(\d+) spills=0 smem=(\d+) sm_80 spill_loads=0 ok$")
    assert lines and all(pat.match(ln) for ln in lines), lines
    assert sorted({pat.match(ln).group(1) for ln in lines}) == ["ds_db", "ds_db_finish", "project"]
    assert all(0 < int(pat.match(ln).group(2)) <= 255 and int(pat.match(ln).group(3)) <= cc.smem_limit(80) for ln in lines)


def test_compile_check_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cc.main(["--arch", "90"]) == 2


def test_compile_check_tma_kernel(tmp_path):
    """The TMA GEMM of the Linear step (tensor-descriptor arguments, block shapes from each config's
    pre-hook) compiles for sm_90a without spills, forward and dx; sm_80 is skipped with the reason."""
    cmd = [sys.executable, "-m", "tools.compile_check", "--arch", "90", "80", "--dtypes", "fp16",
           "--scenarios", "linear-tma", "--kernels", "gemm_tma", "--jobs", "1"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "# skipped _gemm_tma_kernel fp16 sm_80: TMA (tensor descriptors) needs sm_90+" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    pat = re.compile(r"^gemm_tma\[linear-tma/linear_(fwd|bwd)\.[23]\] BM128-BN256-BK64-GROUP_M8-w8-s3 fp16 regs=\d+ "
                     r"spills=0 smem=\d+ sm_90a spill_loads=0 ok$")
    assert sorted(pat.match(ln).group(1) for ln in lines if pat.match(ln)) == ["bwd", "fwd"], lines
    assert len(lines) == 2, lines
