"""The benchmark harness (flora_bench) and the flora-bench CLI, on tiny shapes.

Fast (a few seconds): reference providers only, two timing rounds, one torch thread. Checks
the result document's structure, that the correctness check stops a deliberately wrong
provider (naming provider, shape and tensor), the reports, and the CLI's argument parsing.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from flora_bench import cli, counts, harness, report, shapes
from flora_bench.providers import Built, FLoRAProvider, LoRAProvider, flora_layer
from flora_kernels import cli as runtime_cli

FAST = harness.Budget(warmup=0, min_reps=2, max_reps=2, seconds=0.0)
TINY = [shapes.ALL_SHAPES["tiny-linear-24x20-t10"], shapes.ALL_SHAPES["tiny-dwconv3x3-c6-5-n2"]]
PROVIDERS = ["flora-reference-factorized", "flora-reference-auto", "paper-formula", "lora-torch"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class WrongScale(FLoRAProvider):
    """The reference FLoRA layer with its scale off by 1%: must fail the check."""

    def __init__(self) -> None:
        super().__init__("reference", "factorized")
        self.name = "wrong-scale"

    def build(self, mat, ctx) -> Built:
        layer = flora_layer(mat, "factorized", "reference")
        layer.scale *= 1.01
        return Built(
            self.name,
            "deliberately wrong",
            layer,
            [layer.core, *layer.factors],
            lambda gs: [g.double() for g in gs],
            None,
            merged_skip="n/a",
        )


def _cfg(**kw) -> harness.BenchConfig:
    base = {
        "device": "cpu",
        "shapes": TINY,
        "providers": PROVIDERS,
        "budget": FAST,
        "progress": False,
        "extra_providers": [LoRAProvider(prefer_peft=False, name="lora-torch")],
    }
    base.update(kw)
    return harness.BenchConfig(**base)


def test_run_structure_and_reports(tmp_path):
    res = harness.run(_cfg())
    assert set(res) >= {"meta", "config", "backends", "shapes", "checks", "rows", "skipped", "notes"}
    assert res["meta"]["device"] == "cpu" and res["meta"]["torch"] == torch.__version__
    assert res["backends"]["reference"] == "ok"
    names = ["base"] + PROVIDERS
    assert res["config"]["providers"] == names
    # every provider x mode x shape measured, nothing skipped
    assert not res["skipped"]
    assert len(res["rows"]) == len(TINY) * len(names) * len(counts.MODES)
    for r in res["rows"]:
        assert r["reps"] == 2 and r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
        assert r["flops"] > 0 and r["bytes"] > 0 and r["tflops"] > 0
        assert r["peak_mib"] is None  # CPU: n/a
        if r["provider"] == "base":
            assert r["ratio"] == pytest.approx(1.0)
        if r["mode"] in harness.TRAINING_MODES and r["provider"] != "base":
            assert r["saved_mib"] is not None
    for c in res["checks"]:
        assert c["status"] == ("floor" if c["provider"] == "base" else "ok"), c
        if c["provider"] != "base":
            assert {"train:y", "train:dx", "train:dcore", "train:dfactors[0]", "infer:y", "merged:y"} <= set(
                c["errors"]
            )
            assert c["max_error"] < 1e-5
    for sd in res["shapes"]:
        assert sd["auto_plan"]["train"]["strategy"] in ("factorized", "merged")
        assert "lora-torch" in sd["providers"] and "TorchLoRA" in sd["providers"]["lora-torch"]
    res["verdicts"] = report.verdicts(res)
    assert any("paper formula" in v["text"] for v in res["verdicts"])
    text = report.table(res)
    assert "flora-reference-auto" in text and "check" in text and "floor" in text
    report.write_json(res, str(tmp_path / "r.json"))
    report.write_csv(res, str(tmp_path / "r.csv"))
    report.write_csv(res, str(tmp_path / "r.csv"))  # appends, one header
    report.write_markdown(res, str(tmp_path / "r.md"))
    back = json.loads((tmp_path / "r.json").read_text())
    assert len(back["rows"]) == len(res["rows"])
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(res["rows"])
    assert "| provider |" in (tmp_path / "r.md").read_text()
    assert report.compare(res, back) == []


def test_wrong_provider_stops_the_run():
    cfg = _cfg(
        shapes=TINY[:1],
        providers=["flora-reference-auto", "wrong-scale"],
        extra_providers=[WrongScale()],
        modes=["full"],
    )
    with pytest.raises(harness.CorrectnessError) as ei:
        harness.run(cfg)
    msg = str(ei.value)
    assert "'wrong-scale'" in msg and "'tiny-linear-24x20-t10'" in msg and "relative error" in msg
    assert "tensor " in msg and "train" in msg
    partial = ei.value.result  # type: ignore[attr-defined]
    assert any(c["provider"] == "wrong-scale" and c["status"] == "FAIL" for c in partial["checks"])


def test_keep_going_marks_fail_and_skips_timing():
    cfg = _cfg(
        shapes=TINY[:1],
        providers=["flora-reference-auto", "wrong-scale"],
        extra_providers=[WrongScale()],
        modes=["fwd"],
        keep_going=True,
    )
    res = harness.run(cfg)
    assert [c["status"] for c in res["checks"] if c["provider"] == "wrong-scale"] == ["FAIL"]
    assert not any(r["provider"] == "wrong-scale" for r in res["rows"])
    assert any(r["provider"] == "flora-reference-auto" for r in res["rows"])


def test_unavailable_backend_is_skipped_with_reason():
    status = harness.backends_status()
    missing = [b for b in ("cuda", "triton", "cpp") if status[b] != "ok"]
    if not missing:
        pytest.skip("every backend is available here")
    name = f"flora-{missing[0]}-auto"
    res = harness.run(_cfg(shapes=TINY[:1], providers=[name], modes=["infer"]))
    (sk,) = [s for s in res["skipped"] if s["provider"] == name]
    assert status[missing[0]] in sk["reason"]
    assert [r["provider"] for r in res["rows"]] == ["base"]


def test_counts():
    s = shapes.ALL_SHAPES["conv3x3-c64-28-n8"]
    f_base, _ = counts.counted(s, "fwd", adapted=False)
    assert f_base == 2 * 8 * 28 * 28 * 64 * 64 * 9
    f_full, _ = counts.counted(s, "full", adapted=True)
    assert f_full > 2 * f_base
    assert counts.counted(s, "merged", adapted=True) == counts.counted(s, "merged", adapted=False)


def test_shapes_and_modes_resolution():
    assert [s.name for s in shapes.resolve_shapes(None, "cpu", True)] == [s.name for s in shapes.PRESETS["quick"]]
    assert [s.name for s in shapes.resolve_shapes(None, "cuda", False)] == [s.name for s in shapes.PRESETS["gpu"]]
    assert len(shapes.resolve_shapes("tiny,tiny-linear-24x20-t10", "cpu", False)) == 3
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.resolve_shapes("nope", "cpu", False)
    assert harness.normalize_modes(["forward", "train", "merged"]) == ("fwd", "full", "merged")
    with pytest.raises(ValueError, match="unknown mode"):
        harness.normalize_modes(["sideways"])
    dw = shapes.ALL_SHAPES["dwconv7x7-c96-28-n8"]
    assert dw.ranks == (16, 1, 7, 7) and dw.weight_shape == (96, 1, 7, 7)


def test_cli_parsing_and_list(capsys):
    a = cli.build_parser().parse_args(
        [
            "--device",
            "cpu",
            "--quick",
            "--shapes",
            "tiny",
            "--providers",
            "flora-*-auto,lora",
            "--modes",
            "full,infer",
            "--out",
            "r.json",
            "--csv",
            "r.csv",
            "--plot",
            "r.png",
            "--md",
            "r.md",
            "--threads",
            "1",
        ]
    )
    assert a.device == "cpu" and a.quick and a.shapes == "tiny"
    assert a.providers == ["flora-*-auto", "lora"] and a.modes == ["full", "infer"]
    assert (a.out, a.csv, a.plot, a.md, a.threads) == ("r.json", "r.csv", "r.png", "r.md", 1)
    d = cli.build_parser().parse_args([])
    assert d.device == ("cuda" if torch.cuda.is_available() else "cpu") and d.providers is None
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "conv3x3-c256-56-n64" in out and "paper-formula" in out and "backends:" in out
    assert cli.main(["--device", "cpu", "--shapes", "nope"]) == 1
    assert cli.main(["--device", "cpu", "--shapes", "tiny", "--providers", "nope-*"]) == 1
    assert runtime_cli.main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out
    assert runtime_cli.main(["bench"]) == 1  # the benchmark is not in the runtime package


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(
        [
            "--device",
            "cpu",
            "--shapes",
            "tiny-linear-24x20-t10",
            "--providers",
            "flora-reference-auto",
            "--modes",
            "full",
            "--quick",
            "--no-host",
            "--out",
            str(out),
            "--md",
            str(tmp_path / "r.md"),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "flora-reference-auto" in text and "wrote" in text
    doc = json.loads(out.read_text())
    assert doc["meta"]["argv"][0] == "--device" and doc["verdicts"] is not None
