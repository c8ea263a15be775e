"""FLoRAConfig: defaults, validation messages, dict round trip, target matching."""

from __future__ import annotations

import json

import pytest

import flora_kernels as fk
from flora_kernels.config import name_matches


def test_defaults_match_design():
    c = fk.FLoRAConfig()
    assert (c.rank, c.kernel_rank, c.scale, c.dropout, c.target_modules, c.strategy, c.backend) == (
        16, None, 1.0, 0.0, None, "auto", "auto"
    )
    assert c.modules_to_save == ()


def test_frozen():
    c = fk.FLoRAConfig()
    with pytest.raises(Exception):
        c.rank = 4  # type: ignore[misc]


def test_lists_become_tuples():
    c = fk.FLoRAConfig(rank=[4, 2], kernel_rank=[1, 3], target_modules=["a", "b"], modules_to_save=["h"])
    assert c.rank == (4, 2) and c.kernel_rank == (1, 3)
    assert c.target_modules == ("a", "b") and c.modules_to_save == ("h",)


BAD = [
    (dict(rank=0), r"rank: expected a positive int or a tuple of positive ints, got 0"),
    (dict(rank=-3), r"rank: expected a positive int .*got -3"),
    (dict(rank=(4, 0)), r"rank: expected a positive int .*got \(4, 0\)"),
    (dict(rank=(1, 2, 3)), r"rank: expected an int or \(r_out, r_in\), got \(1, 2, 3\)"),
    (dict(rank=2.0), r"rank: expected a positive int .*got 2.0"),
    (dict(rank=True), r"rank: expected a positive int .*got True"),
    (dict(kernel_rank=0), r"kernel_rank: expected a positive int .*got 0"),
    (dict(scale="1"), r"scale: expected a float, got '1'"),
    (dict(dropout=1.0), r"dropout: expected a probability in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout: expected a probability in \[0, 1\), got -0.1"),
    (dict(strategy="fast"), r"strategy: expected one of \('auto', 'factorized', 'merged'\), got 'fast'"),
    (dict(backend="tpu"), r"backend: expected one of \('auto', 'reference', 'triton', 'cuda', 'cpp'\), got 'tpu'"),
    (dict(target_modules="fc("), r"target_modules: expected a valid regular expression, got 'fc\('"),
    (dict(target_modules=3), r"target_modules: expected a regex string, a list of names or None, got 3"),
    (dict(target_modules=["fc", ""]), r"module names: expected non-empty strings, got ''"),
    (dict(modules_to_save=[1]), r"module names: expected non-empty strings, got 1"),
]


@pytest.mark.parametrize("kwargs,fragment", BAD, ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _ in BAD])
def test_validation_messages(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        fk.FLoRAConfig(**kwargs)


def test_dict_roundtrip_through_json():
    c = fk.FLoRAConfig(rank=(8, 4), kernel_rank=2, scale=0.5, dropout=0.1, target_modules=["q", "v"],
                       modules_to_save=["head"], strategy="merged", backend="reference")
    d = json.loads(json.dumps(c.to_dict()))
    assert d["rank"] == [8, 4] and d["target_modules"] == ["q", "v"]
    assert fk.FLoRAConfig.from_dict(d) == c
    r = fk.FLoRAConfig(target_modules=r"blocks\.\d+\.fc")
    assert fk.FLoRAConfig.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_from_dict_unknown_keys():
    with pytest.raises(ValueError) as e:
        fk.FLoRAConfig.from_dict({"rank": 4, "alpha": 8, "lora_dropout": 0.1})
    msg = str(e.value)
    assert "unknown keys ['alpha', 'lora_dropout']" in msg
    assert "'rank'" in msg and "'target_modules'" in msg  # the known keys are listed


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="rank: expected a positive int"):
        fk.FLoRAConfig.from_dict({"rank": 0})


@pytest.mark.parametrize(
    "name,patterns,want",
    [
        ("encoder.layers.0.fc", ["fc"], True),
        ("encoder.layers.0.fc", ["layers.0.fc"], True),
        ("encoder.layers.0.fc", ["encoder.layers.0.fc"], True),
        ("encoder.layers.0.fc2", ["fc"], False),
        ("encoder.layers.0.myfc", ["fc"], False),
        ("fc", ["fc"], True),
        ("encoder.layers.0.fc", r".*\.fc", True),
        ("encoder.layers.0.fc", r"fc", False),  # a regex string must match the whole name
        ("encoder.layers.0.fc", r"encoder\.layers\.[0-3]\.fc", True),
        ("encoder.layers.7.fc", r"encoder\.layers\.[0-3]\.fc", False),
        ("anything", None, True),
    ],
)
def test_name_matching(name, patterns, want):
    assert name_matches(name, patterns) is want
    cfg = fk.FLoRAConfig(target_modules=patterns)
    assert cfg.matches(name) is want


@pytest.mark.parametrize(
    "name,key,want",
    [
        ("layers.0.q_proj", "q_proj", True),
        ("layers.0.q_proj", r"layers\.0\.q_proj", True),
        ("layers.0.q_proj", r"^layers\.0\.q_proj", True),
        ("x.layers.0.q_proj", r"^layers\.0\.q_proj", False),  # "^" anchors the pattern
        ("layers.0.q_proj", "proj", False),
        ("layers.1.q_proj", r"layers\.[0-1]\.q_proj", True),
    ],
)
def test_rank_and_scale_patterns(name, key, want):
    cfg = fk.FLoRAConfig(rank=4, scale=1.0, rank_pattern={key: (2, 3)}, scale_pattern={key: 0.5})
    assert cfg.rank_for(name) == ((2, 3) if want else 4)
    assert cfg.scale_for(name) == (0.5 if want else 1.0)


def test_new_fields_validated_and_round_trip():
    with pytest.raises(ValueError, match="rank_pattern"):
        fk.FLoRAConfig(rank_pattern={"fc": 0})
    with pytest.raises(ValueError, match="scale_pattern"):
        fk.FLoRAConfig(scale_pattern={"fc": "big"})
    with pytest.raises(ValueError, match="exclude_modules"):
        fk.FLoRAConfig(exclude_modules=3)
    with pytest.raises(ValueError, match="regular expression"):
        fk.FLoRAConfig(rank_pattern={"(": 2})
    cfg = fk.FLoRAConfig(
        target_modules="all-linear", exclude_modules=["head"], rank_pattern={"fc": [2, 3], "conv": 4},
        scale_pattern={"fc": 0.5},
    )
    assert fk.FLoRAConfig.from_dict(cfg.to_dict()) == cfg
