"""Calibrate the CPU cost model (``flora_kernels.plan.CPU_PROFILES``) from measured layer calls.

Runs one training step of each benchmark model (``flora_bench.models``: resnet18, vit_tiny,
convnext_atto) with every Linear/ConvNd adapted, ``strategy="auto"``, and measured dispatch on, and
keeps every measured call: its ``Call`` and each candidate's time. A strategy's time is its fastest
backend's (a candidate pruned after the first round has that one time). Then it scores cost-model profiles by regret, the time lost by the strategy the model
picks over the measured best, summed over the calls, relative to the best's total; it prints the
current profile's regret and the grid's best, and writes every measurement to --out.

    python tools/calibrate_cost_model.py --threads 1 [--image-sizes 64 96] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from dataclasses import asdict

import torch


def measure(threads: int, image_sizes: list[int], batch: int, rank: int) -> list[dict]:
    """[{call, model, times: {strategy: seconds}}] for every measured call of the three models at
    each image size."""
    import flora_kernels as fk
    from flora_bench import models
    from flora_kernels.backends import autotune

    torch.set_num_threads(threads)
    autotune.set_autotune(True)
    autotune.set_dispatch_policy("speed")  # both strategies are candidates, also in training
    captured: list[tuple[object, object]] = []
    real = autotune._measure

    def spy(call, *args, **kwargs):
        d = real(call, *args, **kwargs)
        captured.append((call, d))
        return d

    autotune._measure = spy
    rows = []
    try:
        for name, image_size in itertools.product(models.MODELS, image_sizes):
            autotune.clear_autotune_cache()
            torch.manual_seed(0)
            base, _ = models.make_model(name, image_size)
            m = fk.inject_flora(base.requires_grad_(False), fk.FLoRAConfig(rank=rank))
            x = torch.randn(batch, 3, image_size, image_size, requires_grad=True)
            captured.clear()
            m(x).float().sum().backward()
            for call, d in captured:
                times: dict[str, float] = {}
                for label, t in d.times_s:
                    strategy = label.split("/")[1]
                    times[strategy] = min(t, times.get(strategy, float("inf")))
                if len(times) == 2:
                    rows.append({"model": f"{name}@{image_size}", "call": call, "times": times})
    finally:
        autotune._measure = real
        autotune.set_autotune(None)
        autotune.set_dispatch_policy(None)
    return rows


def regret(rows: list[dict], threads: int, prof) -> float:
    from flora_kernels import plan

    saved = plan.CPU_PROFILES[threads]
    plan.CPU_PROFILES[threads] = prof
    try:
        lost = best = 0.0
        for r in rows:
            pick = plan.plan_call(r["call"]).strategy
            lost += r["times"][pick] - min(r["times"].values())
            best += min(r["times"].values())
        return lost / best
    finally:
        plan.CPU_PROFILES[threads] = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--budget-ms", default="200", help="FLORA_AUTOTUNE_BUDGET_MS per call (default: 200)")
    ap.add_argument("--out", default=None, help="write the measurements and the fit as JSON")
    args = ap.parse_args()
    os.environ["FLORA_AUTOTUNE_BUDGET_MS"] = args.budget_ms
    os.environ["FLORA_CACHE_DIR"] = tempfile.mkdtemp()  # measure, never reuse a cached decision
    from flora_kernels import plan

    rows = measure(args.threads, args.image_sizes, args.batch, args.rank)
    current = plan.profile("cpu", args.threads)
    grid = [
        plan.DeviceProfile(pf, bw, la, mf)
        for pf, bw, la, mf in itertools.product(
            (1.5e10, 3e10, 6e10, 1.2e11, 2.4e11), (5e9, 1e10, 2e10, 4e10), (5e-6, 1.5e-5, 3e-5, 6e-5),
            (4, 8, 16, 32, 64, 128),
        )
    ]
    scored = sorted(((regret(rows, args.threads, p), p) for p in grid), key=lambda s: s[0])
    cur = regret(rows, args.threads, current)
    agree = sum(plan.plan_call(r["call"]).strategy == min(r["times"], key=r["times"].get) for r in rows)
    print(f"{len(rows)} measured calls, {args.threads} thread(s); current profile {current}: regret {cur:.1%}, "
          f"picks the measured best on {agree}/{len(rows)}")
    for s, p in scored[:5]:
        print(f"  regret {s:.1%}: {p}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({
                "threads": args.threads, "image_sizes": args.image_sizes, "batch": args.batch, "rank": args.rank,
                "current": {"profile": asdict(current), "regret": cur, "agree": agree},
                "best": [{"profile": asdict(p), "regret": s} for s, p in scored[:5]],
                "calls": [{"model": r["model"], "call": str(r["call"]), "times_s": r["times"]} for r in rows],
            }, f, indent=1)


if __name__ == "__main__":
    main()
