"""Per-op CPU time of whole-model training steps, side by side for several model providers.

    python bench/profile_model_ops.py convnext_atto flora-reference-merged,flora-cpp-merged --threads 1

Each provider's step (flora_bench.models) runs under torch.profiler twice, interleaved,
and the smaller of the two self-CPU times per op is printed (ms per step). Measured dispatch is
off (the strategies are explicit or the cost model's), so the comparison is of the backends.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

import flora_kernels as fk
from flora_bench import models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=models.MODELS)
    p.add_argument("providers", help="comma-separated model providers, e.g. flora-reference-merged,flora-cpp-merged")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    fk.set_autotune(False)
    torch.manual_seed(0)
    base, src = models.make_model(a.model, a.image_size)
    base.requires_grad_(False)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, requires_grad=True)
    with torch.no_grad():
        dy = torch.randn(base(x).shape)
    cases = [models.build(n, base, 8, 0) for n in a.providers.split(",")]
    for c in cases:
        for _ in range(2):
            models._step(c, x, dy)
    ms: dict[str, dict[str, float]] = {c.name: {} for c in cases}
    for _ in range(2):
        for c in cases:
            with profile() as prof:
                models._step(c, x, dy)
            for e in prof.key_averages():
                old = ms[c.name].get(e.key)
                t = e.self_cpu_time_total / 1e3
                ms[c.name][e.key] = t if old is None else min(old, t)
    keys: set[str] = set()
    for c in cases:
        keys |= {k for k, _ in sorted(ms[c.name].items(), key=lambda kv: -kv[1])[: a.top]}
    print(f"{a.model} ({src}), {a.threads} thread(s), batch {a.batch}, {a.image_size}px: self CPU ms per step")
    print("op".ljust(48) + "".join(c.name[:24].rjust(26) for c in cases))
    for k in sorted(keys, key=lambda k: -ms[cases[0].name].get(k, 0.0)):
        print(k[:48].ljust(48) + "".join(f"{ms[c.name].get(k, 0.0):26.2f}" for c in cases))
    print("total".ljust(48) + "".join(f"{sum(ms[c.name].values()):26.2f}" for c in cases))


if __name__ == "__main__":
    main()
