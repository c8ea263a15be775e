"""What measured dispatch adds to a model's first training steps.

timm resnet18 (pretrained=False, num_classes=10), every conv/Linear adapted (FLoRAConfig(rank=8)),
x (8, 3, 64, 64), one torch thread, a fresh FLORA_CACHE_DIR. Runs the same steps in three
processes: measured dispatch with a cold cache, again with the warm disk cache the first wrote,
and with measured dispatch off (the cost model's choices). Prints each process's step 1, step 2
and steady median (process CPU time), and the first two steps' excess over the steady step.

    python tools/dispatch_cold_cost.py [--steps 8] [--model resnet18]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, statistics, sys, time
import flora_bench.torchvision_compat  # noqa: F401 (CPU torch + CUDA torchvision wheel)
import torch, timm
import flora_kernels as fk
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model(sys.argv[1], pretrained=False, num_classes=10)
fk.inject_flora(model, fk.FLoRAConfig(rank=8))
x = torch.randn(8, 3, 64, 64)
y = torch.randint(0, 10, (8,))
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.process_time()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.process_time() - t0)
print(json.dumps(times))
"""


def run(model: str, steps: int, env: dict[str, str]) -> list[float]:
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(steps)], env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        base = {**os.environ, "FLORA_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        rows = {"cold cache": run(args.model, args.steps, {**base, "FLORA_AUTOTUNE": "1"}),
                "warm cache": run(args.model, args.steps, {**base, "FLORA_AUTOTUNE": "1"}),
                "measuring off": run(args.model, args.steps, {**base, "FLORA_AUTOTUNE": "0"})}
    for name, ts in rows.items():
        steady = statistics.median(ts[2:])
        extra = ts[0] + ts[1] - 2 * steady
        print(f"{name:14s} step1 {ts[0]:.3f} s  step2 {ts[1]:.3f} s  steady {steady:.3f} s  "
              f"first two steps' excess {extra:+.3f} s ({extra / steady:.1f} steady steps)")


if __name__ == "__main__":
    main()
