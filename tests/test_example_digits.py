"""Smoke test of examples/finetune_digits.py: the --quick run completes and prints its table."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

pytest.importorskip("sklearn")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune_digits.py")


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_finetune_digits_quick(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    import torch

    threads = torch.get_num_threads()
    ex = _load_example()
    out = ex.main(["--quick", "--seed", "0", "--save-dir", str(tmp_path / "adapter")])
    text = capsys.readouterr().out

    # The table: header and one row per method, in this order.
    assert "trainable params" in text and "train time (s)" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "trainable params" in line and line.startswith("method"))
    assert set(lines[header + 1]) == {"-"}
    rows = lines[header + 2 : header + 5]
    assert [r.split()[0] for r in rows] == ["FLoRA", "full", "head"], text
    for row, r in zip(rows, out["results"]):
        assert f"{r.accuracy:.4f}" in row and f"{r.trainable:,}" in row
    assert "merge_and_unload" in text and "save_flora/load_flora" in text

    results = {r.method.split()[0]: r for r in out["results"]}
    assert set(results) == {"FLoRA", "full", "head"}
    for r in results.values():
        assert isinstance(r.accuracy, float) and not math.isnan(r.accuracy) and 0.0 <= r.accuracy <= 1.0
        assert r.trainable > 0 and r.seconds >= 0.0
    assert 0.0 <= out["base_acc"] <= 1.0
    # FLoRA (adapters + the new head) trains far fewer parameters than full fine-tuning, the
    # head-only baseline fewer still.
    assert results["head"].trainable < results["FLoRA"].trainable < results["full"].trainable

    # Merging away and saving/loading are exact up to rounding, whatever the accuracy is.
    assert out["merged_plain"]
    assert out["merged_acc"] == results["FLoRA"].accuracy
    assert out["loaded_acc"] == results["FLoRA"].accuracy
    assert out["merged_max_diff"] < 1e-4 and out["loaded_max_diff"] < 1e-4
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]

    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
