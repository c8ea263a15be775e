"""The benchmark's host-path, memory and compile cases and their helpers, at tiny sizes.

Each test checks that the figures are produced and sane (structure, signs, orderings that hold by
construction); none asserts a timing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flora_bench import cli, compile_case, hostpath, memory_case, models
from flora_bench.memory import peak_bytes, saved_bytes
from flora_bench.timing import interleaved, quantile, quantiles
from flora_kernels.testing import tolerance


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_quantiles_and_interleaved_rounds():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    assert quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    with pytest.raises(ValueError, match="empty"):
        quantile([], 0.5)
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then the order rotates
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in times.values() for t in v)
    with pytest.raises(ValueError, match="clock"):
        interleaved({"a": lambda: None}, 1, clock="sundial")


def test_saved_bytes_counts_each_storage_once_without_parameters():
    x = torch.randn(5, 7, requires_grad=True)
    w = nn.Parameter(torch.randn(3, 7))
    # linear saves x (for dW) and w (for dx); w is excluded; x and its view share one storage
    assert saved_bytes(lambda: nn.functional.linear(x, w), [w]) == x.nbytes
    assert saved_bytes(lambda: nn.functional.linear(x, w) + nn.functional.linear(x[1:], w)[:1], [w]) == x.nbytes
    assert saved_bytes(lambda: nn.functional.linear(x.detach(), w.detach()), []) == 0  # no graph
    assert peak_bytes(lambda: None, "cpu") is None  # n/a on a CPU


def test_host_path_case():
    cfg = hostpath.HostConfig(layers=3, rounds=2, inner=1, warmup=0,
                              providers=("frozen", "flora-reference-factorized", "lora"))
    doc = hostpath.run(cfg)
    assert [s["stack"] for s in doc["stacks"]] == ["linear", "conv"] and doc["threads"] == 1
    json.dumps(doc)  # serializable
    for st in doc["stacks"]:
        names = [p for p in cfg.providers if p not in st["skipped"]]
        assert {(r["mode"], r["provider"]) for r in st["rows"]} == {(m, p) for m in hostpath.MODES for p in names}
        for r in st["rows"]:
            assert r["stack_us"] > 0 and r["samples"] == 2 and math.isfinite(r["extra_us_per_layer"])
            assert r["extra_q20"] <= r["extra_us_per_layer"] <= r["extra_q80"]
            if r["provider"] == "frozen":
                assert r["extra_us_per_layer"] == 0
        assert set(st["checks"]) == {"flora-reference-factorized"}
        assert all(e <= tolerance(torch.float32) for e in st["checks"].values())
        if "lora" in st["skipped"]:
            assert "peft" in st["skipped"]["lora"] and st["ratio_to_peft"] == {"infer": {}, "train": {}}
        else:
            for mode in hostpath.MODES:
                lora = next(r for r in st["rows"] if r["mode"] == mode and r["provider"] == "lora")
                if lora["extra_us_per_layer"] > 0:
                    assert set(st["ratio_to_peft"][mode]) == {"flora-reference-factorized"}
    text = hostpath.markdown(doc)
    assert "48 x" not in text and "3 x nn.Linear(64, 64)" in text and "FLoRA extra / PEFT extra" in text
    with pytest.raises(ValueError, match="stacks"):
        hostpath.HostConfig(stacks=("mlp",))


def test_memory_case_small():
    doc = memory_case.run(["resnet18"], ["frozen", "full", "lora", "flora-factorized", "flora-merged", "flora-lean"],
                          rank=4, small=True)
    (m,) = doc["models"]
    saved = {r["provider"]: r["saved_mib"] for r in m["rows"]}
    assert saved["frozen"] > 0 and all(r["peak_mib"] is None for r in m["rows"])  # CPU: no peak
    # full fine-tuning keeps what dx needs plus the weights' inputs; merged adds W + dW per layer
    assert saved["full"] >= saved["frozen"] and saved["flora-merged"] > saved["frozen"]
    assert next(r for r in m["rows"] if r["provider"] == "frozen")["vs_frozen"] == 1.0
    if models.lean_option() is None:
        assert "lean-memory" in m["skipped"]["flora-lean"]
    else:
        assert "flora-lean" in saved
    assert "| flora-merged |" in memory_case.markdown(doc)
    with pytest.raises(ValueError, match="memory models"):
        memory_case.run(["gpt5"])


def test_memory_llama_frozen_has_a_backward():
    pytest.importorskip("transformers")
    w = memory_case.workload("llama")
    res = memory_case.measure(w, ["frozen", "flora-factorized"], rank=4)
    saved = {r["provider"]: r["saved_mib"] for r in res["rows"]}
    assert 0 < saved["frozen"] < saved["flora-factorized"]


def test_compile_case_one_block():
    pytest.importorskip("transformers")
    doc = compile_case.run(blocks=(1,), providers=["flora-auto"], rank=4, rounds=2)
    assert [(r["provider"], r["blocks"]) for r in doc["rows"]] == [("frozen", 1), ("flora-auto", 1)]  # frozen: always
    for r in doc["rows"]:
        assert r["first_step_cpu_s"] > 0 and r["first_step_wall_s"] > 0 and r["frames_first_step"] >= 1
        assert r["graph_breaks"] >= 0 and r["recompiles"] >= 0
        samples = r["first_step_cpu_s_samples"]  # one cold compile per round, the row their median
        assert len(samples) == 2 and r["first_step_cpu_s"] == pytest.approx(sum(samples) / 2)
    assert doc["per_block"] == {}  # one block count: no per-block figure
    assert "| flora-auto | 1 |" in compile_case.markdown(doc)


def test_compile_per_block_figures():
    rows = [{"provider": p, "blocks": b, "first_step_cpu_s": t}
            for p, b, t in [("frozen", 8, 10.0), ("frozen", 16, 14.0), ("lora", 8, 12.0), ("lora", 16, 20.0),
                            ("flora-auto", 8, 13.0), ("flora-auto", 16, 25.0)]]
    pb = compile_case._per_block(rows, [8, 16])
    assert pb["frozen"] == {"cpu_s_per_block": 0.5, "extra_cpu_s_per_block": 0.0}
    assert pb["lora"]["extra_cpu_s_per_block"] == pytest.approx(0.5)
    assert pb["flora-auto"]["extra_over_lora_extra"] == pytest.approx(2.0)


def test_cli_case_flags(tmp_path, capsys):
    a = cli.build_parser().parse_args(["--host", "--compile", "--compile-blocks", "2,4", "--memory",
                                       "--memory-models", "llama", "--host-layers", "6", "--clock", "thread",
                                       "--compile-rounds", "3"])
    assert a.host and a.compile and a.memory and a.compile_blocks == [2, 4] and a.memory_models == ["llama"]
    assert a.compile_rounds == 3
    cfg = cli.host_config(a)
    assert (cfg.layers, cfg.clock, cfg.rounds) == (6, "thread", hostpath.HostConfig().rounds)
    assert cli.host_config(a, quick=True).rounds == hostpath.QUICK.rounds
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--compile-blocks", "8,x"])
    late = {"meta": {"elapsed_s": 100.0}, "notes": []}  # --quick's host case needs the time --max-minutes leaves
    cli._quick_host(cli.build_parser().parse_args(["--quick", "--max-minutes", "1"]), late)
    assert "host_path" not in late and "short host-path case left out" in late["notes"][0]
    out = tmp_path / "h.json"
    rc = cli.main(["--host", "--host-layers", "2", "--rounds", "1", "--host-inner", "1", "--providers",
                   "frozen,flora-reference-factorized", "--no-progress", "--out", str(out), "--md",
                   str(tmp_path / "h.md")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {r["provider"] for s in doc["host_path"]["stacks"] for r in s["rows"]} == {
        "frozen", "flora-reference-factorized"}
    assert "Host path" in (tmp_path / "h.md").read_text() and "command: flora-bench --host" in capsys.readouterr().out
