"""The Triton variant decisions (the factorized conv's "cudnn"/"igemm" per call signature, ``gemm_ext``'s
GEMM variant per shape key) in autotune's disk cache: a decision measured once is written, replayed
after the memory is cleared and in a fresh process without measuring again; ``FLORA_AUTOTUNE=0`` and
CUDA graph capture never measure; ``clear_autotune_cache(disk=True)`` forgets them; a corrupt cache
file is ignored with a warning. CPU has no CUDA timing: the measurements are replaced by counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_triton_helpers import DEVICE, needs_triton

import flora_kernels as fk
from flora_kernels.backends import autotune
from flora_kernels.backends.triton import _common

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache dir and empty memory; the conv and GEMM measurements counted, not timed."""
    from flora_kernels.backends.triton import conv as C
    from flora_kernels.backends.triton import linear as L

    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLORA_AUTOTUNE", raising=False)
    autotune.clear_autotune_cache()
    counts = {"conv": 0, "gemm": 0, "igemm": 0}

    def measure_conv(call, tensors, scale, spec, p):
        counts["conv"] += 1
        return autotune.Decision("triton", "igemm", "measured", str(call), (("triton/cudnn", 2e-3), ("triton/igemm", 1e-3)))

    def measure_gemm(args, variants):
        counts["gemm"] += 1
        return "cublas"

    real = C.ig.conv_igemm_fwd
    monkeypatch.setattr(_common, "measures_variants", lambda device: True)
    monkeypatch.setattr(C, "_measure_variants", measure_conv)
    monkeypatch.setattr(C.ig, "conv_igemm_fwd", lambda *a: counts.__setitem__("igemm", counts["igemm"] + 1) or real(*a))
    monkeypatch.setattr(L, "_measure_variants", measure_gemm)
    yield counts
    autotune.clear_autotune_cache()


def _conv():
    x = torch.randn(1, 3, 5, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    core = torch.randn(2, 2, 2, 2, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, 2, device=DEVICE, requires_grad=True) for n in (4, 3, 3, 3)]
    return fk.flora_conv(x, w, None, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")


def _gemm():
    from flora_kernels.backends.triton import linear as L

    a, b = torch.randn(40, 24, device=DEVICE), torch.randn(24, 20, device=DEVICE)
    a2, b2 = torch.randn(40, 3, device=DEVICE), torch.randn(3, 20, device=DEVICE)
    torch.testing.assert_close(L.gemm_ext(a, b, a2, b2, None), a @ b + a2 @ b2, rtol=1e-5, atol=1e-5)


def _entries() -> dict[str, dict]:
    return json.loads(autotune.cache_path().read_text())["entries"]


def test_measured_once_written_and_replayed(cache):
    from flora_kernels.backends.triton import conv as C
    from flora_kernels.backends.triton import linear as L

    _conv()
    _gemm()
    assert cache == {"conv": 1, "gemm": 1, "igemm": 1}
    choices = {k.split("|")[0]: v["choice"] for k, v in _entries().items() if k.startswith("choice:")}
    assert choices == {"choice:triton_conv_variant": "igemm", "choice:triton_gemm_variant": "cublas"}
    _conv()
    _gemm()
    assert cache == {"conv": 1, "gemm": 1, "igemm": 2}  # in memory
    autotune.clear_autotune_cache()  # memory only: the choices come back from disk
    assert not C.conv_variant_report() and not L.gemm_choices()
    _conv()
    _gemm()
    assert cache == {"conv": 1, "gemm": 1, "igemm": 3}
    (d,) = C.conv_variant_report()
    assert d.source == "cached" and d.strategy == "igemm" and dict(d.times_s) == pytest.approx({"triton/cudnn": 2e-3,
                                                                                                  "triton/igemm": 1e-3})
    assert list(L.gemm_choices().values()) == ["cublas"]
    autotune.clear_autotune_cache(disk=True)  # and the file: measured again
    assert not autotune.cache_path().exists()
    _conv()
    _gemm()
    assert cache == {"conv": 2, "gemm": 2, "igemm": 4}


def test_autotune_off_and_graph_capture_never_measure(cache, monkeypatch):
    from flora_kernels.backends.triton import conv as C

    monkeypatch.setenv("FLORA_AUTOTUNE", "0")
    _conv()
    _gemm()
    assert cache == {"conv": 0, "gemm": 0, "igemm": 0}  # the defaults ("cudnn"; "tiled" where TMA does not apply)
    monkeypatch.delenv("FLORA_AUTOTUNE")
    monkeypatch.setattr(autotune, "capturing", lambda device: True)
    _conv()
    _gemm()
    assert cache == {"conv": 0, "gemm": 0, "igemm": 0} and not C.conv_variant_report()
    monkeypatch.setattr(autotune, "capturing", lambda device: False)
    _conv()
    _gemm()
    assert cache == {"conv": 1, "gemm": 1, "igemm": 1}
    autotune.clear_autotune_cache()
    monkeypatch.setattr(autotune, "capturing", lambda device: True)
    _conv()  # capture: a decision on disk is replayed, nothing is timed
    _gemm()
    assert cache == {"conv": 1, "gemm": 1, "igemm": 2}


def test_corrupt_cache_is_ignored_with_a_warning(cache):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.warns(autotune.AutotuneWarning, match="unreadable"):
        _conv()
    assert cache["conv"] == 1
    assert any(k.startswith("choice:triton_conv_variant") for k in _entries())  # rewritten, valid
    autotune.clear_autotune_cache()
    doc = json.loads(path.read_text())
    for k in doc["entries"]:
        doc["entries"][k] = {"choice": 3}  # malformed
    path.write_text(json.dumps(doc))
    with pytest.warns(autotune.AutotuneWarning, match="malformed"):
        _conv()
    assert cache["conv"] == 2
    autotune.clear_autotune_cache()
    doc = json.loads(path.read_text())
    doc["fingerprint"]["torch"] = "0.0"  # stale: another torch made it
    path.write_text(json.dumps(doc))
    with pytest.warns(autotune.AutotuneWarning, match="stale"):
        _conv()
    assert cache["conv"] == 3


def test_fresh_process_replays_without_measuring(cache):
    """A new interpreter with the same cache dir reads both decisions; its measurements would raise."""
    _conv()
    _gemm()
    assert cache["conv"] == 1 and cache["gemm"] == 1
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch
        import test_triton_variant_cache as t
        from flora_kernels.backends.triton import _common, conv as C, linear as L

        def boom(*a):
            raise AssertionError("measured again")

        _common.measures_variants = lambda device: True
        C._measure_variants = L._measure_variants = boom
        torch.manual_seed(0)
        t._conv()
        t._gemm()
        (d,) = C.conv_variant_report()
        print(d.source, d.strategy, list(L.gemm_choices().values()))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLORA_CACHE_DIR": str(autotune.cache_path().parent)}
    out = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=os.getcwd(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "cached igemm ['cublas']"
