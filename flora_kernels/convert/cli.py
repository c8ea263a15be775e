"""``flora-extract``: FLoRA adapters from a pair of checkpoints, without the model's class.

    flora-extract BASE TUNED --rank R [--kernel-rank K] [--energy E] --out DIR [--format kohya]

BASE and TUNED are ``.safetensors`` files or torch state dicts (``.pt``/``.pth``/``.bin``, a
top-level ``state_dict`` entry is unwrapped). Every 2- to 5-D ``<module>.weight`` present in
both with the same shape (and matching ``--target``) is a candidate; the modes come from the
shapes (see ``skeleton_from_state_dicts``). Writes FLoRA's format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``fk.load_flora`` onto the real model) or, with
``--format kohya``, one kohya/LyCORIS ``.safetensors`` file, plus ``extract_report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..model import save_flora
from .extract import extract_flora, skeleton_from_state_dicts
from .lycoris import KOHYA_PREFIXES, LYCORIS_PREFIX, export_lycoris

KOHYA_FILE = "lora.safetensors"
REPORT_FILE = "extract_report.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_state_dict(path: str) -> Mapping[str, Tensor]:
    """A flat {name: tensor} from a ``.safetensors`` file or a torch checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a .safetensors file or a torch state dict)")
    if path.endswith(".safetensors"):
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _rank(text: str) -> int | tuple[int, ...]:
    vals = tuple(int(v) for v in text.split(","))
    return vals[0] if len(vals) == 1 else vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flora-extract", description="Extract FLoRA (Tucker) adapters from a base and a fine-tuned checkpoint."
    )
    p.add_argument("base", help="base checkpoint (.safetensors or torch state dict)")
    p.add_argument("tuned", help="fine-tuned checkpoint with the same keys")
    p.add_argument("--rank", type=_rank, default=None, help="channel rank: R or R_OUT,R_IN (the cap with --energy)")
    p.add_argument("--kernel-rank", type=_rank, default=None, help="conv kernel rank(s); default: the full kernel")
    p.add_argument("--energy", type=float, default=None, help="keep this fraction of ||dW||^2 per mode (0, 1]")
    p.add_argument("--out", required=True, help="output directory (or a .safetensors path with --format kohya)")
    p.add_argument("--format", choices=("flora", "kohya"), default="flora")
    p.add_argument("--prefix", default=LYCORIS_PREFIX, help=f"kohya key prefix, e.g. {', '.join(KOHYA_PREFIXES)}")
    p.add_argument("--no-mid", action="store_true", help="kohya: plain LoCon convs (no lora_mid), e.g. for diffusers")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="kohya: dtype of the weights written")
    p.add_argument("--target", action="append", default=None,
                   help="module name or suffix to adapt (repeatable); default: every changed weight")
    p.add_argument("--method", choices=("hooi", "hosvd"), default="hooi")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no report table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rank is None and args.energy is None:
        parser().error("give --rank, --energy or both")
    t0 = time.perf_counter()
    base, tuned = read_state_dict(args.base), read_state_dict(args.tuned)
    model = skeleton_from_state_dicts(base, tuned, args.target)
    extract_flora(model, tuned, rank=args.rank, kernel_rank=args.kernel_rank, energy=args.energy,
                  method=args.method, progress=not args.quiet)
    report = model.flora_extraction
    if args.format == "kohya":
        path = args.out if args.out.endswith(".safetensors") else os.path.join(args.out, KOHYA_FILE)
        export_lycoris(model, path, args.prefix, mid=not args.no_mid, dtype=DTYPES[args.dtype])
        out_dir = os.path.dirname(os.path.abspath(path))
    else:
        save_flora(model, args.out)
        out_dir, path = args.out, args.out
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(dataclasses.asdict(report), f, indent=1)
    if not args.quiet:
        print(report)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
