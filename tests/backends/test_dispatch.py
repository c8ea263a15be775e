"""Measured dispatch: candidates checked against the reference, the cache (memory and disk: corrupt,
stale, unwritable), the switches, torch.compile, threads, reports, and ops a backend lacks.
No assertion depends on which candidate is faster."""

from __future__ import annotations

import json
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flora_kernels as fk
from flora_kernels.backends import Call, base
from flora_kernels.backends import autotune as at
from flora_kernels.backends.reference import ReferenceBackend


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FLORA_AUTOTUNE", "1")
    monkeypatch.setenv("FLORA_AUTOTUNE_BUDGET_MS", "0")
    monkeypatch.delenv("FLORA_BACKEND", raising=False)
    monkeypatch.setenv("FLORA_DISPATCH_POLICY", "speed")  # every strategy a candidate (memory: its own tests)
    at.set_autotune(None)
    at.clear_autotune_cache()
    yield
    at.set_autotune(None)
    at.force_dispatch(None)
    at.set_dispatch_policy(None)
    at.clear_autotune_cache()


@pytest.fixture
def measured(monkeypatch):
    """Counts the measurements made."""
    count = []
    real = at._measure

    def spy(*args, **kwargs):
        count.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(at, "_measure", spy)
    return count


def _linear(n=6, i=9, o=7, r=(3, 2), grad=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, i, generator=g).requires_grad_(grad)
    w, b = torch.randn(o, i, generator=g), torch.randn(o, generator=g)
    core = torch.randn(r, generator=g).requires_grad_(grad)
    fs = [torch.randn(o, r[0], generator=g).requires_grad_(grad), torch.randn(i, r[1], generator=g).requires_grad_(grad)]
    return x, w, b, core, fs


def _oracle(x, w, b, core, fs, scale=0.7):
    return F.linear(x, w + scale * fs[0] @ core @ fs[1].t(), b)


def test_measures_once_then_memo_then_disk(measured):
    x, w, b, core, fs = _linear()
    y = fk.flora_linear(x, w, b, core, fs, 0.7)
    torch.testing.assert_close(y, _oracle(x, w, b, core, fs))
    fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 1
    (d,) = fk.dispatch_report()
    assert d.source == "measured" and d.label in dict(d.times_s) and len(d.times_s) >= 2
    doc = json.loads(at.cache_path().read_text())
    assert len(doc["entries"]) == 1 and doc["fingerprint"] == at.fingerprint()
    at.clear_autotune_cache()  # a new process: memory empty, the disk cache answers
    fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 1
    assert [d.source for d in fk.dispatch_report()] == ["cached"]
    # another signature (no grad) is measured on its own
    with torch.no_grad():
        fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 2


def test_corrupt_cache_warns_and_works(measured):
    at.cache_path().parent.mkdir(parents=True)
    at.cache_path().write_text("{not json")
    x, w, b, core, fs = _linear()
    with pytest.warns(fk.AutotuneWarning, match="unreadable"):
        y = fk.flora_linear(x, w, b, core, fs, 0.7)
    torch.testing.assert_close(y, _oracle(x, w, b, core, fs))
    assert len(measured) == 1
    assert json.loads(at.cache_path().read_text())["entries"]  # rewritten


def test_malformed_document_and_entries_warn(measured):
    at.cache_path().parent.mkdir(parents=True)
    at.cache_path().write_text(json.dumps([1, 2]))
    x, w, b, core, fs = _linear()
    with pytest.warns(fk.AutotuneWarning, match="corrupt"):
        fk.flora_linear(x, w, b, core, fs, 0.7)
    at.clear_autotune_cache()
    doc = json.loads(at.cache_path().read_text())
    key = next(iter(doc["entries"]))
    doc["entries"][key] = {"backend": 3, "strategy": "sideways"}
    at.cache_path().write_text(json.dumps(doc))
    with pytest.warns(fk.AutotuneWarning, match="malformed"):
        fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 2  # the malformed entry was not used


def test_stale_cache_warns_and_is_ignored(measured):
    x, w, b, core, fs = _linear()
    fk.flora_linear(x, w, b, core, fs, 0.7)
    doc = json.loads(at.cache_path().read_text())
    doc["fingerprint"]["torch"] = "0.0.1-old"
    at.cache_path().write_text(json.dumps(doc))
    at.clear_autotune_cache()
    with pytest.warns(fk.AutotuneWarning, match="stale"):
        fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 2
    assert json.loads(at.cache_path().read_text())["fingerprint"] == at.fingerprint()


def test_unknown_cached_backend_is_measured_again(measured):
    x, w, b, core, fs = _linear()
    fk.flora_linear(x, w, b, core, fs, 0.7)
    doc = json.loads(at.cache_path().read_text())
    for v in doc["entries"].values():
        v["backend"] = "gone"
    at.cache_path().write_text(json.dumps(doc))
    at.clear_autotune_cache()
    fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 2


def test_unwritable_cache_warns_and_keeps_memory(tmp_path, monkeypatch, measured):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("FLORA_CACHE_DIR", str(blocker / "sub"))  # a directory under a file: mkdir fails
    x, w, b, core, fs = _linear()
    with pytest.warns(fk.AutotuneWarning, match="not writable"):
        y = fk.flora_linear(x, w, b, core, fs, 0.7)
    torch.testing.assert_close(y, _oracle(x, w, b, core, fs))
    fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 1


class _Wrong(ReferenceBackend):
    """The reference with a wrong scale: what measured dispatch must catch."""

    name = "wrong"

    def reconstruct(self, core, factors, scale, base):
        return super().reconstruct(core, factors, scale * 1.5, base)

    def linear(self, x, weight, bias, core, factors, scale, dropout_p):
        return super().linear(x, weight, bias, core, factors, scale * 1.5, dropout_p)


class _Raises(ReferenceBackend):
    name = "raises"

    def linear(self, *args):
        raise RuntimeError("kernel exploded")


@pytest.fixture
def fake_backends():
    base.register("wrong", _Wrong, auto_rank=-2)
    base.register("raises", _Raises, auto_rank=-1)
    yield
    base.unregister("wrong")
    base.unregister("raises")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_disagreeing_and_raising_candidates_are_dropped(fake_backends, dropout_p):
    x, w, b, core, fs = _linear()
    with pytest.warns(fk.AutotuneWarning) as rec:
        y = fk.flora_linear(x, w, b, core, fs, 0.7, dropout_p=dropout_p)
    msgs = " ".join(str(r.message) for r in rec)
    for label in ("wrong/factorized", "wrong/merged"):
        assert f"dropped {label}" in msgs and "disagrees" in msgs
    assert "dropped raises/factorized" in msgs and "kernel exploded" in msgs
    (d,) = fk.dispatch_report()
    assert f"{d.backend}/{d.strategy}" not in dict(d.dropped)  # raises/merged works: it may win
    assert {k for k, _ in d.dropped} == {"wrong/factorized", "wrong/merged", "raises/factorized"}
    assert "raises/merged" in dict(d.times_s)  # its merged path (the reference reconstruct) is fine
    if dropout_p == 0:
        torch.testing.assert_close(y, _oracle(x, w, b, core, fs))


def _depthwise(grad=True):
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    x = torch.randn(2, 16, 9, 11, generator=g).requires_grad_(grad)
    core = torch.randn(4, 1, 7, 7, generator=g).requires_grad_(grad)
    fs = [torch.randn(16, 4, generator=g), torch.randn(1, 1, generator=g), torch.randn(7, 7, generator=g),
          torch.randn(7, 7, generator=g)]
    return conv, x, core, [f.requires_grad_(grad) for f in fs]


def test_autocast_candidates_judged_in_the_compute_dtype(monkeypatch):
    """Under bf16 autocast the reference path itself is off by ~1e-2: the candidates that agree with
    it as well as it agrees with float64 are kept (they were all dropped at fp32's 1e-3)."""
    monkeypatch.setattr(at, "PLAN_PRUNE", 10.0)  # both strategies run (the cost model puts them 3.1x apart)
    conv, x, core, fs = _depthwise()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error", fk.AutotuneWarning)
        y = fk.flora_conv(x, conv.weight.detach(), conv.bias.detach(), core, fs, 0.5, padding=3, groups=16)
        y.float().sum().backward()
    (d,) = fk.dispatch_report()
    assert d.source == "measured" and not d.dropped
    assert {"reference/merged", "reference/factorized"} <= set(dict(d.times_s))
    assert "autocast=bfloat16" in d.call


def test_autocast_still_drops_a_wrong_candidate(fake_backends):
    x, w, b, core, fs = _linear()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(fk.AutotuneWarning) as rec:
        fk.flora_linear(x, w, b, core, fs, 0.7)
    msgs = " ".join(str(r.message) for r in rec)
    assert "dropped wrong/factorized" in msgs and "dropped wrong/merged" in msgs


def test_autocast_is_part_of_the_call():
    x, w, _b, core, fs = _linear()
    plain = Call.describe("linear", x=x, weight=w, core=core, factors=fs, strategy="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = Call.describe("linear", x=x, weight=w, core=core, factors=fs, strategy="auto")
    assert plain.autocast is None and mixed.autocast == torch.bfloat16 and plain != mixed
    assert plain.compute_dtype == torch.float32 and mixed.compute_dtype == torch.bfloat16


def test_explicit_backend_auto_strategy_all_dropped(fake_backends, measured):
    """An explicit backend whose every strategy disagrees: warned once, then the cost model's pick
    (what was asked for), remembered so that it is not measured again."""
    x, w, b, core, fs = _linear()
    with pytest.warns(fk.AutotuneWarning) as rec:
        fk.flora_linear(x, w, b, core, fs, 0.7, backend="wrong")
    assert all(f"dropped wrong/{s}" in " ".join(str(r.message) for r in rec) for s in ("factorized", "merged"))
    fk.flora_linear(x, w, b, core, fs, 0.7, backend="wrong")
    (d,) = fk.dispatch_report()
    assert len(measured) == 1 and d.backend == "wrong" and d.source == "cost-model" and not d.times_s
    assert {k for k, _ in d.dropped} == {"wrong/factorized", "wrong/merged"}
    assert d.strategy == fk.functional.plan_linear_call(x, w, core, fs, 0.0).strategy


def test_switches(monkeypatch, measured):
    x, w, b, core, fs = _linear()
    monkeypatch.setenv("FLORA_AUTOTUNE", "0")
    assert not fk.autotune_enabled()
    with fk.record_dispatch() as rep:
        y = fk.flora_linear(x, w, b, core, fs, 0.7)
    torch.testing.assert_close(y, _oracle(x, w, b, core, fs))
    assert not measured and rep[""][0].source == "cost-model"
    plan = fk.functional.plan_linear_call(x, w, core, fs, 0.0)
    assert rep[""][0].strategy == plan.strategy
    fk.set_autotune(True)  # the Python switch wins over the environment
    fk.flora_linear(x, w, b, core, fs, 0.7)
    assert len(measured) == 1
    fk.set_autotune(False)
    monkeypatch.setenv("FLORA_AUTOTUNE", "1")
    fk.flora_linear(x[:3], w, b, core, fs, 0.7)  # a new signature, not measured
    assert len(measured) == 1
    with pytest.raises(TypeError, match="True, False or None"):
        fk.set_autotune("yes")


def test_no_measurement_under_compile(measured):
    x, w, b, core, fs = _linear()

    def f(x, core, f0, f1):
        return fk.flora_linear(x, w, b, core, [f0, f1], 0.7)

    torch._dynamo.reset()
    y = torch.compile(f, backend="eager", fullgraph=True)(x, core, *fs)
    torch.testing.assert_close(y, _oracle(x, w, b, core, fs))
    assert not measured and not fk.dispatch_report()
    f(x, core, *fs)  # eager: measures; compiled code traced from now on uses the decision
    assert len(measured) == 1
    torch._dynamo.reset()
    torch.compile(f, backend="eager", fullgraph=True)(x, core, *fs)
    assert len(measured) == 1


def test_thread_safe_single_measurement(measured):
    x, w, b, core, fs = _linear(grad=False)
    outs, errors = [], []

    def work():
        try:
            with torch.no_grad():
                outs.append(fk.flora_linear(x, w, b, core, fs, 0.7))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 4 and len(measured) == 1
    for y in outs:
        torch.testing.assert_close(y, _oracle(x, w, b, core, fs))


def test_record_dispatch_per_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.conv = nn.Conv2d(2, 4, 3, padding=1)

        def forward(self, x):
            return self.fc(self.conv(x))

    model = fk.inject_flora(Net(), fk.FLoRAConfig(rank=2))
    x = torch.randn(2, 2, 5, 8, requires_grad=True)
    with fk.record_dispatch(model) as rep:
        model(x).sum().backward()
    assert set(rep) == {"fc", "conv"}
    for ds in rep.values():
        assert ds[0].source in ("measured", "single") and ds[0].backend in base.backend_names()
    with pytest.raises(RuntimeError, match="already recording"), fk.record_dispatch(), fk.record_dispatch():
        pass


class _LinearOnly(ReferenceBackend):
    name = "linear-only"
    reconstruct = None  # type: ignore[assignment]
    project = None  # type: ignore[assignment]


def test_op_a_backend_lacks_is_unsupported():
    base.register("linear-only", _LinearOnly, auto_rank=-1)
    try:
        core, fs = torch.randn(2, 3), [torch.randn(4, 2), torch.randn(5, 3)]
        with pytest.raises(fk.BackendUnavailable, match="backend 'linear-only' cannot run reconstruct: it does not "
                                                          "implement the op 'reconstruct'"):
            fk.tucker_reconstruct(core, fs, backend="linear-only")
        assert torch.allclose(fk.tucker_reconstruct(core, fs), fs[0] @ core @ fs[1].t(), atol=1e-6)  # auto: others
        x, w = torch.randn(3, 5), torch.randn(4, 5)
        with pytest.raises(fk.BackendUnavailable, match="merged strategy: it does not implement reconstruct"):
            fk.flora_linear(x, w, None, core, fs, strategy="merged", backend="linear-only")
        # an op no backend has heard of: explicit requests say so, auto has nobody
        call = Call.describe("embedding", x=torch.randn(3, 4))
        with pytest.raises(fk.BackendUnavailable, match="'cpp' cannot run embedding: it does not implement"):
            at.resolve(call, "cpp")
        with pytest.raises(fk.BackendUnavailable, match="no backend can run embedding"):
            at.resolve(call, "auto")
    finally:
        base.unregister("linear-only")


def test_registry_is_the_source_of_names_and_order():
    assert {"reference", "triton", "cuda", "cpp"} <= set(base.backend_names())
    order = base.auto_order()
    assert order[-1] == "reference" and set(order) == set(base.backend_names())
    base.register("extra", ReferenceBackend, auto_rank=None)
    try:
        assert "extra" in base.backend_names() and "extra" not in base.auto_order()
        assert fk.available_backends()["extra"] == "ok"
        x, w, b, core, fs = _linear()
        y = fk.flora_linear(x, w, b, core, fs, 0.7, strategy="factorized", backend="extra")
        torch.testing.assert_close(y, _oracle(x, w, b, core, fs))
        # the config and the layers read the live registry, not a snapshot taken at import
        fk.FLoRAConfig(rank=2, backend="extra")
        layer = fk.FLoRALinear(nn.Linear(5, 4), rank=2, backend="extra")
        assert layer.backend == "extra"
    finally:
        base.unregister("extra")
    with pytest.raises(ValueError, match="got 'extra'"):
        fk.flora_linear(x, w, b, core, fs, backend="extra")
    with pytest.raises(ValueError, match="got 'extra'"):
        fk.FLoRAConfig(rank=2, backend="extra")


def test_call_description():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 3, 3, 3)
    core, fs = torch.randn(2, 2, 3, 3), [torch.randn(6, 2), torch.randn(3, 2), torch.randn(3, 3), torch.randn(3, 3)]
    spec = fk.ConvSpec.make((3, 3), padding=1)
    c = Call.describe("conv", x=x, weight=w, core=core, factors=fs, conv=spec, strategy="auto", dropout_p=0.1)
    assert c.x.layout == "channels_last" and c.weight.layout == "contiguous" and c.dropout
    assert c.x_needs_grad and not c.adapter_needs_grad and c.needs_grad and c.threads == torch.get_num_threads()
    assert c == Call.describe("conv", x=x, weight=w, core=core, factors=fs, conv=spec, strategy="auto", dropout_p=0.2)
    with torch.no_grad():
        c2 = Call.describe("conv", x=x, weight=w, core=core, factors=fs, conv=spec, strategy="auto", dropout_p=0.1)
    assert c2 != c and not c2.needs_grad and hash(c2) != hash(c)
    r = c.with_strategy("merged").reconstruct_call()
    assert r.op == "reconstruct" and r.base == c.weight and r.factors == c.factors
    assert "channels_last" in str(c) and "strategy=auto" in str(c)


def test_cost_model_knows_threads():
    """The profile follows the thread count, and the 3x3 conv training step is factorized at 1 and
    2 threads (measured here: 1.51-1.54x vs 1.86-1.92x the frozen step at 1 thread, 1.64-1.83x vs
    1.74-2.00x at 2; docs/ARCHITECTURE.md, Performance targets)."""
    from flora_kernels import plan

    spec = fk.ConvSpec.make((3, 3), 1, 1)
    args = ((8, 64, 28, 28), (64, 64, 3, 3), (16, 16, 3, 3), spec, 4, "cpu", True, True, False)
    one, two = plan.plan_conv(*args, threads=1), plan.plan_conv(*args, threads=2)
    assert (one.strategy, two.strategy) == ("factorized", "factorized")
    assert plan.plan_conv(*args, threads=8).merged_s < two.merged_s  # more threads: the big dW_eff op is cheaper
    assert plan.profile("cpu", 8).peak_flops == 4 * plan.profile("cpu", 2).peak_flops
    x = torch.randn(8, 64, 28, 28, requires_grad=True)
    c = Call.describe("conv", x=x, weight=torch.randn(64, 64, 3, 3), core=torch.randn(16, 16, 3, 3, requires_grad=True),
                      factors=[torch.randn(64, 16), torch.randn(64, 16), torch.randn(3, 3), torch.randn(3, 3)], conv=spec)
    assert plan.plan_call(c) == plan.plan_conv(*args, threads=torch.get_num_threads())


def _scripted(monkeypatch, seqs):
    """Candidate label -> its successive times (seconds); the candidates still run (and are verified)."""
    seen: dict[str, int] = {}

    def timed(self, c, p, reps=1):  # a scripted sample stands for the mean of its reps
        k = seen[c.label] = seen.get(c.label, -1) + 1
        seq = seqs(c)
        return self.run(c, p), seq[min(k, len(seq) - 1)]

    monkeypatch.setattr(at._Measurement, "timed", timed)


@pytest.mark.parametrize(("other", "prior_wins"), [
    ([5e-3] * 7, False),  # clearly faster every round
    ([31e-6, 60e-6, 31e-6, 31e-6, 31e-6, 31e-6, 31e-6], False),  # one slow round: still 20 us ahead, noise 14.5 us
    ([9e-3, 5e-3, 13e-3, 9e-3, 9e-3, 9e-3, 9e-3], True),  # 1 ms ahead in median, inside its 4 ms noise
])
def test_winner_is_the_lowest_median_outside_the_noise(monkeypatch, other, prior_wins):
    """The lowest median wins unless its lead over the cost model's pick is inside the rounds' noise
    (half their range); the pick's own rounds: 51 us or 10 ms every round."""
    monkeypatch.setenv("FLORA_AUTOTUNE_BUDGET_MS", "1000")
    monkeypatch.setattr(at, "BUDGET_RUNS", 10.0)  # room for every round
    x, w, b, core, fs = _linear()
    call = Call.describe("linear", x=x, weight=w, bias=b, core=core, factors=fs, strategy="auto")
    prior = at._cost_model(call, at.candidates(call, "auto"))
    mine = [51e-6] * 7 if other[0] < 1e-3 else [10e-3] * 7
    _scripted(monkeypatch, lambda c: mine if c == prior else other)
    fk.flora_linear(x, w, b, core, fs, 0.7)
    (d,) = fk.dispatch_report()
    assert len(d.times_s) >= 2 and d.source == "measured"
    assert ((d.backend, d.strategy) == (prior.backend.name, prior.strategy)) == prior_wins
    assert d.reason.startswith("the cost model's pick") == prior_wins


def test_clearly_slower_candidates_stop_after_the_first_round(monkeypatch):
    """A candidate whose verification run is slower than PRUNE_RATIO x the fastest is not timed; the
    rounds stop once the leader is clear (MIN_ROUNDS)."""
    x, w, b, core, fs = _linear()
    counts: dict[str, int] = {}
    call = Call.describe("linear", x=x, weight=w, bias=b, core=core, factors=fs, strategy="auto")
    labels = [c.label for c in at.candidates(call, "auto")]
    slow, fast = labels[0], labels[1]

    def seqs(c):
        counts[c.label] = counts.get(c.label, 0) + 1
        return [10e-3] if c.label == slow else [1e-3] if c.label == fast else [1.5e-3]

    _scripted(monkeypatch, seqs)
    fk.flora_linear(x, w, b, core, fs, 0.7)
    (d,) = fk.dispatch_report()
    verified = {k: int(k != "reference/factorized") for k in counts}  # the reference's first run is untimed
    assert counts[slow] == 1 and all(n == at.MIN_ROUNDS + verified[k] for k, n in counts.items() if k != slow)
    assert d.label == fast


def test_a_decision_for_a_backend_that_became_unavailable_is_redone(monkeypatch):
    """A remembered decision naming a backend that no longer loads is decided again."""
    flaky = type("_Flaky", (_Raises,), {"name": "flaky"})
    base.register("flaky", flaky, auto_rank=-1)  # first in auto's order; its merged path works
    _scripted(monkeypatch, lambda c: [1e-3])  # a tie: the cost model's pick stays
    try:
        x, w, b, core, fs = _linear()
        for measuring in (True, False):
            at.set_autotune(measuring)
            at.clear_autotune_cache()
            fk.flora_linear(x, w, b, core, fs, 0.7, strategy="merged")
            store = at._STATE.memo if measuring else at._STATE.planned  # measured / cost-model decisions
            assert [d.backend for d in store.values()] == ["flaky"]
            monkeypatch.setitem(base._INSTANCES, "flaky", "failed to load: ImportError: gone (test)")
            y = fk.flora_linear(x, w, b, core, fs, 0.7, strategy="merged")
            assert [d.backend for d in store.values()] != ["flaky"]
            torch.testing.assert_close(y, _oracle(x, w, b, core, fs))
            monkeypatch.delitem(base._INSTANCES, "flaky")
    finally:
        base.unregister("flaky")


def _training_linear(t=4, i=64, o=48, r=(3, 2)):
    """A training call where the dense W + dW (o x i) dwarfs the activations (t x i)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(t, i, generator=g, requires_grad=True)
    w = torch.randn(o, i, generator=g)
    core = torch.randn(r, generator=g).requires_grad_()
    fs = [torch.randn(o, r[0], generator=g).requires_grad_(), torch.randn(i, r[1], generator=g).requires_grad_()]
    return x, w, core, fs


def test_memory_aware_policy_keeps_merged_out_of_training(monkeypatch):
    """In training, the default policy drops the merged path (it saves the dense W + dW, 48 x 64 fp32
    against 4 x (64 + 2) for factorized) with its reason and both estimates; "speed" keeps it; no grad
    or an explicit strategy="merged" is never dropped."""
    from flora_kernels import plan

    monkeypatch.delenv("FLORA_DISPATCH_POLICY")
    x, w, core, fs = _training_linear()
    call = Call.describe("linear", x=x, weight=w, core=core, factors=fs, strategy="auto")
    fact, merged = plan.saved_bytes(call.with_strategy("factorized")), plan.saved_bytes(call.with_strategy("merged"))
    assert (fact, merged) == (4 * (4 * 64 + 4 * 2), 4 * (4 * 64 + 48 * 64))
    fk.flora_linear(x, w, None, core, fs)
    (d,) = fk.dispatch_report()
    assert d.strategy == "factorized" and {k for k, _ in d.dropped} == {"cpp/merged", "reference/merged"}
    assert all("memory-aware" in why for _, why in d.dropped)
    assert dict(d.saved_bytes) == {"cpp/factorized": fact, "reference/factorized": fact, "cpp/merged": merged,
                                   "reference/merged": merged}
    fk.set_dispatch_policy("speed")
    fk.flora_linear(x, w, None, core, fs)
    d = fk.dispatch_report()[-1]
    assert not d.dropped and "cpp/merged" in dict(d.times_s)
    fk.set_dispatch_policy(None)
    with torch.no_grad():
        fk.flora_linear(x, w, None, core, fs)
    assert not fk.dispatch_report()[-1].dropped and plan.saved_bytes(call.with_strategy("merged")) > 0
    fk.flora_linear(x, w, None, core, fs, strategy="merged")
    assert fk.dispatch_report()[-1].strategy == "merged"
    with pytest.raises(ValueError, match="expected one of"):
        fk.set_dispatch_policy("fastest")


class _Quantized(torch.Tensor):
    """A floating tensor subclass standing in for a quantized weight (torch's own ops run on it)."""


def test_opaque_or_missing_weight_never_reaches_weight_readers():
    """A weight that is not a plain floating tensor: only the reference path's factorized op (torch's
    own op on the weight object) is a candidate; packed integer data or no weight: none, with the reason."""
    x, w, core, fs = _training_linear()
    q = w.as_subclass(_Quantized)
    call = Call.describe("linear", x=x, weight=q, core=core, factors=fs, strategy="auto")
    assert call.weight.layout == "opaque" and not call.weight_readable
    assert [c.label for c in at.candidates(call, "auto", auto_only=False)] == ["reference/factorized"]
    y = fk.flora_linear(x, q, None, core, fs)
    torch.testing.assert_close(y.as_subclass(torch.Tensor), _oracle(x, w, None, core, fs, scale=1.0))
    with pytest.raises(fk.BackendUnavailable, match="merged strategy adds dW to the base weight"):
        fk.flora_linear(x, q, None, core, fs, strategy="merged", backend="reference")
    with pytest.raises(fk.BackendUnavailable, match="read the base weight's memory"):
        fk.flora_linear(x, q, None, core, fs, backend="cpp")
    packed = Call.describe("linear", x=x, weight=torch.zeros(48, 32, dtype=torch.uint8), core=core, factors=fs,
                           strategy="auto")
    with pytest.raises(fk.BackendUnavailable, match="packed torch.uint8"):
        at.candidates(packed, "auto")
    missing = Call.describe("linear", x=x, core=core, factors=fs, strategy="factorized")
    with pytest.raises(fk.BackendUnavailable, match="base computed elsewhere"):
        at.resolve(missing, "auto")


def test_force_dispatch_fills_the_auto_parts(monkeypatch):
    """force_dispatch / FLORA_BACKEND name backend[/strategy[/variant]]; explicit arguments win."""
    x, w, b, core, fs = _linear()
    fk.force_dispatch("reference/merged")
    with fk.record_dispatch() as rep:
        fk.flora_linear(x, w, b, core, fs, 0.7)
        fk.flora_linear(x, w, b, core, fs, 0.7, strategy="factorized", backend="cpp")
    assert [d.label for d in rep[""]] == ["reference/merged", "cpp/factorized"]
    fk.force_dispatch(None)
    monkeypatch.setenv("FLORA_BACKEND", "auto/factorized")
    with fk.record_dispatch() as rep:
        fk.flora_linear(x, w, b, core, fs, 0.7)
    assert rep[""][0].strategy == "factorized"
    with pytest.raises(ValueError, match="expected one of"):
        fk.force_dispatch("nonsense/merged")
    with pytest.raises(ValueError, match="expected a strategy"):
        fk.force_dispatch("cpp/sideways")


def d_call(x, w, b, core, fs) -> Call:
    return Call.describe("linear", x=x, weight=w, bias=b, core=core, factors=fs, strategy="auto")


def test_cheap_calls_are_timed_as_means_of_back_to_back_runs(monkeypatch):
    """Rounds of a call whose verification runs take 50 us repeat it to fill MIN_SAMPLE_S (at most
    MAX_REPS runs per sample); a 5 ms call is timed run by run."""
    for first_s, want in ((50e-6, min(at.MAX_REPS, math.ceil(at.MIN_SAMPLE_S / 50e-6))), (5e-3, 1)):
        at.clear_autotune_cache(disk=True)
        reps_seen: list[int] = []

        def timed(self, c, p, reps=1, first_s=first_s, reps_seen=reps_seen):
            reps_seen.append(reps)
            return self.run(c, p), first_s

        monkeypatch.setattr(at._Measurement, "timed", timed)
        monkeypatch.setenv("FLORA_AUTOTUNE_BUDGET_MS", "1000")
        x, w, b, core, fs = _linear()
        fk.flora_linear(x, w, b, core, fs, 0.7)
        (d,) = fk.dispatch_report()
        assert d.source == "measured"
        rounds = reps_seen[len(at.candidates(d_call(x, w, b, core, fs), 'auto')) - 1:]  # after one verification run each
        assert set(reps_seen[:-len(rounds)]) == {1} and rounds and set(rounds) == {want}, reps_seen


def test_a_strategy_the_cost_model_finds_much_slower_is_not_run(monkeypatch):
    """A depthwise 7x7 conv in training: the cost model predicts factorized several times slower
    than merged, so no factorized candidate runs (each listed as dropped, with why); the oracle is
    the reference path's merged strategy, and the decision is measured among the merged ones."""
    monkeypatch.setenv("FLORA_AUTOTUNE_BUDGET_MS", "1000")
    layer = fk.FLoRAConv2d(nn.Conv2d(40, 40, 7, padding=3, groups=40), rank=8)
    x = torch.randn(8, 40, 24, 24, requires_grad=True)
    p = layer.plan(x)
    assert p.factorized_s > at.PLAN_PRUNE * p.merged_s  # the premise, from the cost model
    ran: list[str | None] = []
    real_run = at._Measurement.run

    def run(self, c, p_, exact=False):
        ran.append(c.strategy)
        return real_run(self, c, p_, exact)

    monkeypatch.setattr(at._Measurement, "run", run)
    layer(x).sum().backward()
    (d,) = [d for d in fk.dispatch_report() if d.source == "measured"]
    assert d.strategy == "merged" and set(ran) == {"merged"}
    dropped = dict(d.dropped)
    assert any(k.endswith("/factorized") and "cost model predicts" in v for k, v in dropped.items()), dropped


def test_use_autotune_sets_and_restores():
    at.set_autotune(True)
    with at.use_autotune(False):
        assert not at.autotune_enabled()
        with at.use_autotune(None):  # None: as it is
            assert not at.autotune_enabled()
    assert at.autotune_enabled()
    with pytest.raises(TypeError, match="expected True, False or None"), at.use_autotune("yes"):  # type: ignore[arg-type]
        pass
    assert at.autotune_enabled()
