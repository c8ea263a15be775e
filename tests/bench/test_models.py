"""flora-bench --models: the package's model definitions, providers, one tiny run and its report."""

from __future__ import annotations

import pytest
import torch

from flora_bench import models
from flora_bench.cli import main as bench_main


@pytest.mark.parametrize("name,classes", [("resnet18", 1000), ("vit_tiny", 1000), ("convnext_atto", 1000)])
def test_definitions_shapes_and_layers(name, classes):
    m, src = models.make_model(name, 32)
    assert ("timm" in src) or (type(m).__name__ in src)
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, classes)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    if name == "convnext_atto":
        assert sum(c.groups > 1 for c in convs) == 12  # one depthwise 7x7 per block
    if name == "resnet18":
        assert len(convs) == 20


def test_unknown_provider_and_model():
    base, _ = models.make_model("convnext_atto", 32)
    with pytest.raises(ValueError, match="unknown model provider 'flora-fast'"):
        models.build("flora-fast", base, 4, 0)
    with pytest.raises(ValueError, match="expected one of"):
        models.make_model("resnet50", 32)


def test_tiny_run_and_report(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FLORA_AUTOTUNE", "0")
    md, out = tmp_path / "m.md", tmp_path / "m.json"
    threads = torch.get_num_threads()
    try:
        rc = bench_main(["--models", "convnext_atto", "--providers", "frozen,flora-auto,flora-cpp-merged,lora,full",
                         "--batch", "1", "--image-size", "32", "--rounds", "1", "--threads", "1",
                         "--md", str(md), "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = md.read_text()
    for p in ("frozen", "flora-auto", "flora-cpp-merged", "lora", "full"):
        assert f"| {p} |" in text
    assert "flora-cpp-merged dispatch: cpp/merged [explicit]" in text
    assert "convnext_atto" in out.read_text()
