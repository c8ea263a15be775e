"""``flora-bench`` (also ``python -m flora_bench``): the benchmark's command line.

    flora-bench --quick                       # CPU: small shapes, a few minutes on 2 cores
    flora-bench --device cpu --out r.json --md r.md --plot r.png
    flora-bench --device cuda --providers 'base,flora-*-auto,lora' --modes full,infer
    flora-bench --models resnet18,vit_tiny,convnext_atto --threads 1 --md m.md   # whole-model steps

Exit status: 0 on success, 2 when a provider fails its correctness check (the message names
provider, shape, tensor and error), 3 when ``--baseline`` finds a ratio regression.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch

from flora_kernels import __version__

# --quick stops starting new shapes/modes after this long (the rest is reported as skipped),
# so that the README's main job stays within a few minutes even on a loaded machine.
QUICK_MAX_MINUTES = 2.5


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _csv_list(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``flora-bench`` argument parser (exposed for tests and docs)."""
    from .counts import MODES
    from .shapes import PRESETS

    p = argparse.ArgumentParser(
        prog="flora-bench",
        description=(
            "Benchmark FLoRA adapters against the frozen base layer and their peers (PEFT LoRA, the paper's "
            "formula, torch.compile), per backend and strategy, in forward / backward / training-step / "
            "inference / merged-inference modes. Every provider is checked against the float64 reference "
            "path before it is timed."
        ),
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=_default_device(),
        help="where to run (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller CPU shapes (preset 'quick'), fewer repeats, no torch.compile on CPU, --max-minutes 2.5",
    )
    p.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated presets ({', '.join(PRESETS)}) or shape names; default: 'gpu' on cuda, "
        "'cpu' on cpu, 'quick' with --quick on cpu (see --list)",
    )
    p.add_argument(
        "--providers",
        type=_csv_list,
        default=None,
        help="comma-separated provider names or fnmatch patterns, e.g. 'flora-*-auto,lora'; the base "
        "is always included; an exact name forces a provider skipped by default (default: all)",
    )
    p.add_argument(
        "--modes",
        type=_csv_list,
        default=list(MODES),
        help="comma-separated modes out of " + ",".join(MODES) + " (default: all)",
    )
    p.add_argument("--out", metavar="results.json", help="write the full result document (JSON)")
    p.add_argument("--csv", metavar="results.csv", help="append one line per (shape, provider, mode) to this CSV")
    p.add_argument("--plot", metavar="results.png", help="plot ratio to base per provider and shape (matplotlib)")
    p.add_argument("--md", metavar="results.md", help="write a Markdown report")
    p.add_argument(
        "--baseline",
        metavar="old.json",
        help="regression check: compare ratios with a previous --out file, exit 3 if one grew > 10%%",
    )
    p.add_argument(
        "--render",
        metavar="results.json",
        help="do not run: re-render a previous --out file (table, verdicts, --out, --md, --plot, --csv, --baseline)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop starting new shapes/modes after this long; the rest is reported as skipped "
        "(default: none, or 2.5 with --quick)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="on a correctness failure mark the provider FAIL and go on (exit status 2 at the end)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and adapter (default: 0)")
    m = p.add_argument_group("model cases (--models): the training step of whole models, ratios to the frozen model")
    m.add_argument(
        "--models",
        type=_csv_list,
        default=None,
        help="comma-separated models out of resnet18, vit_tiny, convnext_atto (or 'all'): run these instead of "
        "the layer shapes; --providers then picks out of frozen, full, lora, flora-<strategy>, "
        "flora-<backend>-<strategy> (default: frozen, flora-auto, flora-factorized, flora-merged, lora, full)",
    )
    m.add_argument("--batch", type=int, default=8, help="model cases: batch size (default: 8)")
    m.add_argument("--image-size", type=int, default=96, help="model cases: input resolution (default: 96)")
    m.add_argument("--rank", type=int, default=8, help="model cases: adapter rank, FLoRA and LoRA (default: 8)")
    m.add_argument("--rounds", type=int, default=7, help="model cases: timed interleaved rounds (default: 7)")
    m.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="model cases: wall time, or the process's CPU time (with --threads 1, robust to other "
                   "load on the machine; default: wall)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list shapes, providers and modes, then exit")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"flora_kernels {__version__}")
    return p


def _list(out) -> None:
    from .counts import MODES
    from .providers import backends_status, default_providers
    from .shapes import PRESETS

    print("shapes:", file=out)
    for name, shapes in PRESETS.items():
        print(f"  preset {name}:", file=out)
        for s in shapes:
            print(f"    {s.name:<28} {s.describe()}", file=out)
    print("providers:", file=out)
    for p in default_providers():
        print(f"  {p.name}", file=out)
    print("modes: " + ", ".join(MODES), file=out)
    print("backends: " + ", ".join(f"{k}: {v}" for k, v in backends_status().items()), file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """``flora-bench``: run the benchmark, print the table, write the requested files."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.list:
        _list(sys.stdout)
        return 0
    from . import harness
    from .shapes import resolve_shapes

    if args.render:
        import json

        with open(args.render) as f:
            result = json.load(f)
        return _report(args, result, 0)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("flora-bench: --device cuda but torch.cuda.is_available() is False; use --device cpu", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models:
        return _models_main(args)
    try:
        shapes = resolve_shapes(args.shapes, args.device, args.quick)
        modes = harness.normalize_modes(args.modes)
    except ValueError as e:
        print(f"flora-bench: {e}", file=sys.stderr)
        return 1
    notes = []
    if args.device == "cpu":
        from .env import loadavg

        la, n = loadavg(), os.cpu_count() or 1
        if la and la[0] > 0.75 * n:
            msg = (
                f"machine loaded: load average {la[0]:.1f} on {n} logical CPUs while timing with "
                f"{torch.get_num_threads()} torch threads; CPU timings will be noisy"
                + (
                    ""
                    if torch.get_num_threads() == 1
                    else " (with several threads, OpenMP waits on descheduled threads: consider --threads 1)"
                )
            )
            print(f"flora-bench: warning: {msg}", file=sys.stderr)
            notes.append(msg)
    max_minutes = args.max_minutes
    if max_minutes is None and args.quick:
        max_minutes = QUICK_MAX_MINUTES
    cfg = harness.BenchConfig(
        device=args.device,
        shapes=shapes,
        providers=args.providers,
        modes=modes,
        quick=args.quick,
        keep_going=args.keep_going,
        max_minutes=max_minutes,
        seed=args.seed,
        progress=not args.no_progress,
    )
    status = 0
    try:
        result = harness.run(cfg)
    except harness.CorrectnessError as e:
        print(f"flora-bench: {e}", file=sys.stderr)
        result = getattr(e, "result", None)
        if result is None:
            return 2
        status = 2
    except ValueError as e:
        print(f"flora-bench: {e}", file=sys.stderr)
        return 1
    result["meta"]["argv"] = list(sys.argv[1:] if argv is None else argv)
    result["notes"] = notes + result.get("notes", [])
    return _report(args, result, status)


def _models_main(args: argparse.Namespace) -> int:
    """``flora-bench --models``: whole-model training steps; prints Markdown, writes --md / --out."""
    import json

    from . import models

    names = list(models.MODELS) if args.models == ["all"] else args.models
    providers = args.providers or list(models.DEFAULT_PROVIDERS)
    log = None if args.no_progress else (lambda msg: print(msg, file=sys.stderr))
    results = []
    try:
        for name in names:
            results.append(models.run_model(name, providers, args.batch, args.image_size, args.rank, args.rounds,
                                            args.seed, log, args.clock))
    except (ValueError, AssertionError) as e:
        print(f"flora-bench: {e}", file=sys.stderr)
        return 2 if isinstance(e, AssertionError) else 1
    from .env import environment

    env = environment(args.device)
    head = (f"Run {env['date_utc']} on {env['device_name']}, torch {env['torch']}, load average "
            f"{env['loadavg_start']} at the end; command: flora-bench {' '.join(sys.argv[1:])}\n\n")
    text = head + models.markdown(results)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "argv": sys.argv[1:], "models": results}, f, indent=1)
    return 0


def _report(args: argparse.Namespace, result: dict, status: int) -> int:
    """Verdicts, the stdout table and the requested files; returns the exit status."""
    from . import report

    result["verdicts"] = report.verdicts(result)
    print(report.table(result))
    if any(c["status"] == "FAIL" for c in result["checks"]):
        status = 2
    if args.out:
        report.write_json(result, args.out)
    if args.csv:
        report.write_csv(result, args.csv)
    if args.md:
        report.write_markdown(result, args.md)
    if args.plot:
        try:
            report.plot(result, args.plot)
        except ImportError as e:
            print(f"flora-bench: --plot needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
    if args.baseline:
        import json

        with open(args.baseline) as f:
            regressions = report.compare(result, json.load(f))
        for line in regressions:
            print(f"regression: {line}")
        if regressions and status == 0:
            status = 3
    written = [p for p in (args.out, args.csv, args.md, args.plot) if p]
    if written:
        print("wrote " + ", ".join(written))
    return status
