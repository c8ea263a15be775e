"""The Triton variant choices (the factorized conv's "cudnn"/"igemm", the factorized Linear's GEMM
"tiled"/"cublas") are candidates of the one dispatcher and share its disk cache: a decision measured
once is written, replayed after the memory is cleared and in a fresh process without measuring
again; ``FLORA_AUTOTUNE=0`` and CUDA graph capture never measure; ``clear_autotune_cache(disk=True)``
forgets them; a corrupt cache file is ignored with a warning. The interpreter's variants are allowed
here (auto takes the default off CUDA) and the measurement is replaced by a counter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from triton_helpers import DEVICE, needs_triton

import flora_kernels as fk
from flora_kernels.backends import autotune

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

WINNERS = {"conv": "igemm", "linear": "cublas"}


def allow_variants() -> None:
    """Off CUDA, let auto choose among the Triton variants (the TMA kernel aside)."""
    from flora_kernels.backends.triton import TritonBackend

    TritonBackend.variant_reason = lambda self, call, v, auto=False: "not here" if v == "tma" else None


def fake_measure(call, cands, runner, tensors, dropout_p):
    """Picks WINNERS[op] without running anything."""
    c = next(c for c in cands if c.variant == WINNERS[call.op])
    return autotune._decision(call, c, "measured", tuple((k.label, 1e-3) for k in cands), reason="test")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache dir and empty memory; measurements counted per op, not made."""
    from flora_kernels.backends.triton import TritonBackend

    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLORA_AUTOTUNE", raising=False)
    monkeypatch.setattr(TritonBackend, "variant_reason", TritonBackend.variant_reason)
    allow_variants()
    autotune.clear_autotune_cache()
    counts = {"conv": 0, "linear": 0}

    def measure(call, *args):
        counts[call.op] += 1
        return fake_measure(call, *args)

    monkeypatch.setattr(autotune, "_measure", measure)
    yield counts
    autotune.clear_autotune_cache()


def _conv():
    x = torch.randn(1, 3, 5, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    core = torch.randn(2, 2, 2, 2, device=DEVICE, requires_grad=True)
    fs = [torch.randn(n, 2, device=DEVICE, requires_grad=True) for n in (4, 3, 3, 3)]
    return fk.flora_conv(x, w, None, core, fs, 0.5, padding=1, strategy="factorized", backend="triton")


def _linear():
    x, w = torch.randn(40, 24, device=DEVICE), torch.randn(20, 24, device=DEVICE)
    core, fs = torch.randn(3, 3, device=DEVICE), [torch.randn(20, 3, device=DEVICE), torch.randn(24, 3, device=DEVICE)]
    return fk.flora_linear(x, w, None, core, fs, 0.5, strategy="factorized", backend="triton")


def _variants() -> dict[str, str]:
    return {d.call.split()[0]: f"{d.variant} {d.source}" for d in fk.dispatch_report()}


def _entries() -> dict[str, dict]:
    return json.loads(autotune.cache_path().read_text())["entries"]


def test_measured_once_written_and_replayed(cache):
    _conv()
    _linear()
    assert cache == {"conv": 1, "linear": 1}
    assert sorted(v["variant"] for v in _entries().values()) == ["cublas", "igemm"]
    _conv()
    _linear()
    assert cache == {"conv": 1, "linear": 1}  # in memory
    autotune.clear_autotune_cache()  # memory only: the choices come back from disk
    assert not fk.dispatch_report()
    _conv()
    _linear()
    assert cache == {"conv": 1, "linear": 1}
    assert _variants() == {"conv": "igemm cached", "linear": "cublas cached"}
    autotune.clear_autotune_cache(disk=True)  # and the file: measured again
    assert not autotune.cache_path().exists()
    _conv()
    _linear()
    assert cache == {"conv": 2, "linear": 2}


def test_autotune_off_and_graph_capture_never_measure(cache, monkeypatch):
    monkeypatch.setenv("FLORA_AUTOTUNE", "0")
    _conv()
    _linear()
    assert cache == {"conv": 0, "linear": 0}
    assert _variants() == {"conv": "cudnn cost-model", "linear": "tiled cost-model"}  # the backend's defaults
    monkeypatch.delenv("FLORA_AUTOTUNE")
    monkeypatch.setattr(autotune, "capturing", lambda device: True)
    _conv()
    _linear()
    assert cache == {"conv": 0, "linear": 0}
    monkeypatch.setattr(autotune, "capturing", lambda device: False)
    _conv()
    _linear()
    assert cache == {"conv": 1, "linear": 1}


def test_corrupt_cache_is_ignored_with_a_warning(cache):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.warns(fk.AutotuneWarning, match="unreadable"):
        _conv()
    assert cache["conv"] == 1 and len(_entries()) == 1  # rewritten, valid
    autotune.clear_autotune_cache()
    doc = json.loads(path.read_text())
    for k in doc["entries"]:
        doc["entries"][k] = {"backend": "triton", "strategy": "factorized", "variant": 3}  # malformed
    path.write_text(json.dumps(doc))
    with pytest.warns(fk.AutotuneWarning, match="malformed"):
        _conv()
    assert cache["conv"] == 2
    autotune.clear_autotune_cache()
    doc = json.loads(path.read_text())
    doc["fingerprint"]["torch"] = "0.0"  # stale: another torch made it
    path.write_text(json.dumps(doc))
    with pytest.warns(fk.AutotuneWarning, match="stale"):
        _conv()
    assert cache["conv"] == 3


def test_fresh_process_replays_without_measuring(cache):
    """A new interpreter with the same cache dir reads both decisions; its measurements would raise."""
    _conv()
    _linear()
    assert cache == {"conv": 1, "linear": 1}
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch
        import test_triton_variant_cache as t
        from flora_kernels.backends import autotune

        def boom(*a):
            raise AssertionError("measured again")

        t.allow_variants()
        autotune._measure = boom
        torch.manual_seed(0)
        t._conv()
        t._linear()
        print(sorted(t._variants().items()))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLORA_CACHE_DIR": str(autotune.cache_path().parent)}
    out = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=os.getcwd(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "[('conv', 'igemm cached'), ('linear', 'cublas cached')]"
