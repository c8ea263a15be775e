"""``flora-bench`` (also ``python -m flora_bench``): the benchmark's command line.

    flora-bench --quick                       # CPU: small shapes, a few minutes on 2 cores
    flora-bench --device cpu --out r.json --md r.md --plot r.png
    flora-bench --device cuda --providers 'base,flora-*-auto,lora' --modes full,infer
    flora-bench --models resnet18,vit_tiny,convnext_atto --threads 1 --md m.md   # whole-model steps
    flora-bench --host --md host.md --out host.json        # host path: 48 tiny adapted layers, vs PEFT LoRA
    flora-bench --memory --md mem.md                        # saved-for-backward / peak memory of a step
    flora-bench --compile --compile-blocks 8,16             # torch.compile first step per extra block

Exit status: 0 on success, 2 when a provider fails its correctness check (the message names
provider, shape, tensor and error), 3 when ``--baseline`` finds a ratio regression.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence

import torch

from flora_kernels import __version__

# --quick stops starting new shapes/modes after this long (the rest is reported as skipped),
# so that the README's main job stays within a few minutes even on a loaded machine.
QUICK_MAX_MINUTES = 2.5
# What --quick's short host-path case takes at most on a loaded 2-core machine (about 20 s idle).
QUICK_HOST_S = 60


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _csv_list(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in _csv_list(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


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
        help="smaller CPU shapes (preset 'quick'), fewer repeats, no torch.compile on CPU, --max-minutes 2.5 "
        "for the shapes, then a short host-path case (--no-host: without it)",
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
    m.add_argument("--rounds", type=int, default=None,
                   help="model cases: timed interleaved rounds (default: 7; --host: 15)")
    m.add_argument("--clock", choices=("wall", "cpu", "thread"), default=None,
                   help="model cases: wall time, the process's CPU time (cpu) or the calling thread's (thread); "
                   "with one torch thread CPU time is robust to other load on the machine (default: wall; "
                   "--host: thread)")
    c = p.add_argument_group(
        "other cases (run instead of the layer shapes; several may be combined; --providers picks out of the "
        "model-case names, --rank applies)"
    )
    c.add_argument("--host", action="store_true",
                   help="host-path case: 48 x Linear(64, 64) and 48 x Conv2d(16, 16, 3) stacks, every layer adapted; "
                   "extra CPU time per adapted layer and call, forward (no_grad) and training step, FLoRA vs PEFT "
                   "LoRA, 1 torch thread (a short version runs with --quick)")
    c.add_argument("--no-host", action="store_true", help="--quick: leave out the short host-path case")
    c.add_argument("--host-layers", type=int, default=48, help="--host: layers per stack (default: 48)")
    c.add_argument("--host-inner", type=int, default=None, help="--host: stack calls per timed sample (default: 10)")
    c.add_argument("--compile", action="store_true",
                   help="compile case: torch.compile(backend='aot_eager') first training step of a tiny Llama, per "
                   "extra block, frozen / PEFT LoRA / FLoRA, with graph breaks and recompiles (about 2-3 min of CPU)")
    c.add_argument("--compile-blocks", type=_int_list, default=[8, 16],
                   help="--compile: block counts (default: 8,16; the figure is per extra block between the extremes)")
    c.add_argument("--compile-rounds", type=int, default=1,
                   help="--compile: cold compiles per provider and block count, medians reported (default 1; one "
                   "varies by up to 2x on a shared machine: 3 or more for a figure to compare)")
    c.add_argument("--memory", action="store_true",
                   help="memory case: tensors saved for backward (and the GPU peak) in one training step of a tiny "
                   "Llama, timm resnet18 and vit_tiny: frozen, full, PEFT LoRA, FLoRA per strategy, FLoRA lean")
    c.add_argument("--memory-models", type=_csv_list, default=None,
                   help="--memory: models out of llama, resnet18, vit_tiny (default: all three)")
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
    print("other cases: --models (resnet18, vit_tiny, convnext_atto), --host (48-layer Linear and Conv2d stacks), "
          "--memory (llama, resnet18, vit_tiny), --compile (tiny Llama, --compile-blocks)", file=out)
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
    if args.models or args.host or args.compile or args.memory:
        return _cases_main(args, argv)
    try:
        shapes = resolve_shapes(args.shapes, args.device, args.quick)
        modes = harness.normalize_modes(args.modes)
    except ValueError as e:
        print(f"flora-bench: {e}", file=sys.stderr)
        return 1
    notes = _load_warning(args)
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
    if args.quick and not args.no_host and status == 0:
        _quick_host(args, result)
    result["meta"]["argv"] = list(sys.argv[1:] if argv is None else argv)
    result["notes"] = notes + result.get("notes", [])
    return _report(args, result, status)


def _quick_host(args: argparse.Namespace, result: dict) -> None:
    """--quick's short host-path case, into ``result["host_path"]``; left out (with a note) when an
    explicit --max-minutes leaves less than QUICK_HOST_S after the layer shapes."""
    from . import hostpath

    elapsed = result["meta"].get("elapsed_s", 0.0)
    if args.max_minutes is not None and elapsed + QUICK_HOST_S > args.max_minutes * 60:
        result["notes"].append(f"short host-path case left out: --max-minutes {args.max_minutes} leaves less than "
                               f"{QUICK_HOST_S} s after {elapsed:.0f} s of layer shapes")
        return
    result["host_path"] = hostpath.run(host_config(args, quick=True), _log(args))


def _load_warning(args: argparse.Namespace) -> list[str]:
    """A note (also printed) when a CPU run starts on a loaded machine."""
    from .env import loadavg

    la, n = loadavg(), os.cpu_count() or 1
    if args.device != "cpu" or not la or la[0] <= 0.75 * n:
        return []
    msg = (
        f"machine loaded: load average {la[0]:.1f} on {n} logical CPUs while timing with "
        f"{torch.get_num_threads()} torch threads; CPU timings will be noisy"
        + ("" if torch.get_num_threads() == 1
           else " (with several threads, OpenMP waits on descheduled threads: consider --threads 1)")
    )
    print(f"flora-bench: warning: {msg}", file=sys.stderr)
    return [msg]


def _log(args: argparse.Namespace) -> Callable[[str], None] | None:
    return None if args.no_progress else (lambda msg: print(msg, file=sys.stderr))


def _run_models(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from . import models

    names = list(models.MODELS) if args.models == ["all"] else args.models
    providers = args.providers or list(models.DEFAULT_PROVIDERS)
    results = [models.run_model(name, providers, args.batch, args.image_size, args.rank, args.rounds or 7, args.seed,
                                _log(args), args.clock or "wall") for name in names]
    return models.markdown(results), results


def host_config(args: argparse.Namespace, quick: bool = False):
    """The host-path case's configuration from the flags (``quick``: the short version)."""
    from . import hostpath

    base = hostpath.QUICK if quick else hostpath.HostConfig()
    kw = {"layers": args.host_layers, "rank": args.rank, "seed": args.seed}
    if args.rounds:
        kw["rounds"] = args.rounds
    if args.host_inner:
        kw["inner"] = args.host_inner
    if args.clock:
        kw["clock"] = args.clock
    if args.providers and not quick:
        kw["providers"] = tuple(args.providers)
    return dataclasses.replace(base, **kw)


def _run_host(args: argparse.Namespace) -> tuple[str, dict]:
    from . import hostpath

    doc = hostpath.run(host_config(args), _log(args))
    return hostpath.markdown(doc), doc


def _run_compile(args: argparse.Namespace) -> tuple[str, dict]:
    from . import compile_case

    providers = args.providers or list(compile_case.PROVIDERS)
    doc = compile_case.run(args.compile_blocks, providers, args.rank, args.seed, _log(args), args.compile_rounds)
    return compile_case.markdown(doc), doc


def _run_memory(args: argparse.Namespace) -> tuple[str, dict]:
    from . import memory_case

    providers = args.providers or list(memory_case.PROVIDERS)
    doc = memory_case.run(args.memory_models or list(memory_case.MODELS), providers, args.rank, args.device,
                          args.seed, log=_log(args))
    return memory_case.markdown(doc), doc


def _cases_main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """The cases other than the layer shapes (--models, --host, --compile, --memory), in that order:
    prints Markdown, writes --md / --out (one document, a key per case)."""
    import json

    from .env import environment

    env = environment(args.device)
    cmd = list(sys.argv[1:] if argv is None else argv)
    doc: dict = {"env": env, "argv": cmd}
    texts = []
    runners = (("models", args.models, _run_models), ("host_path", args.host, _run_host),
               ("compile", args.compile, _run_compile), ("memory", args.memory, _run_memory))
    try:
        for key, wanted, runner in runners:
            if wanted:
                text, doc[key] = runner(args)
                texts.append(text)
    except (ValueError, AssertionError) as e:
        print(f"flora-bench: {e}", file=sys.stderr)
        return 2 if isinstance(e, AssertionError) else 1
    from .env import loadavg

    head = (f"Run {env['date_utc']} on {env['device_name']}, torch {env['torch']}, load average "
            f"{env['loadavg_start']} at the start and {loadavg()} at the end; command: flora-bench {' '.join(cmd)}\n\n")
    text = head + "\n".join(texts)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
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
