"""Compile the Triton kernels of this backend for CUDA targets without a GPU, as the benchmark
launches them, and check their registers, spills and shared memory.

    python -m tools.compile_check [--all-configs] [--arch 90 80]
        [--dtypes bf16 fp16 fp32] [--scenarios ...] [--kernels SUBSTR ...] [--jobs N]

The launches are recorded, not written down: every scenario (the benchmark shapes:
Linear 4096 x 4096 at T = 8192, rank 16, with and without dropout (the dropout step
also trains the bias), with the GEMMs on the tiled kernel and on the persistent TMA kernel
(``-tma``; no configs below sm_90), and the dropout step at T = 512 (``-t512``: the split-K
shrink whose partials the GEMM sums); Conv2d N = 64, C = 256,
56 x 56, 3 x 3, ranks (16, 16, 3, 3), channels_last; its implicit-GEMM variant at N = 8, C = 64,
28 x 28, with and without dropout, and grouped (groups = 2) with dropout (the packed mask from
``mask_bits``); the depthwise 7 x 7 ConvNeXt conv) runs forward and backward through the
backend's entry points on meta tensors, with each ``flora_triton`` op's real implementation in place of its fake and each kernel launch captured
instead of run (``split_for`` sized for 132 SMs). Each captured launch is then specialised by
Triton's own binder for the target (16-byte pointer alignment, integers divisible by 16 or
equal to 1, exactly as at run time), compiled through the GPU front end, the TTGIR passes and
ptxas (bundled with triton), and reported as one line per kernel x config x dtype x target:

    <kernel> <config> <dtype> regs=<n> spills=<bytes> smem=<bytes> <target> spill_loads=<bytes> <verdict>

``spills`` is ptxas's spill stores, ``smem`` Triton's shared-memory allocation per CTA. The
exit status is 1 on any compile error, any spill, or shared memory above the target's
per-block limit (the SM's shared memory less the 1 KiB reserved per CTA); 0 otherwise.
Without ``--all-configs`` only the first config of each autotuned kernel is compiled.
TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

#: Shared memory per SM in KiB by compute capability (less 1 KiB per CTA gives the block limit).
SMEM_KIB = {80: 164, 86: 100, 87: 164, 89: 100, 90: 228}
#: SMs that ``split_for`` sizes its splits for during recording (H100 SXM and H200).
BENCH_SMS = 132
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def smem_limit(arch: int) -> int:
    """Bytes of shared memory one CTA may allocate on compute capability ``arch``."""
    if arch not in SMEM_KIB:
        raise ValueError(f"arch: expected one of {sorted(SMEM_KIB)}, got {arch}")
    return (SMEM_KIB[arch] - 1) * 1024


# ----------------------------------------------------------------------------- recording


class _Ptr:
    """A tensor argument as Triton's binder sees it: dtype and a 16-byte-aligned base address
    plus the view's storage offset (torch's CUDA allocations are 512-byte aligned)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self._addr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr


@dataclass
class Launch:
    """One captured kernel launch: ``fn[grid](*args, **kwargs)`` (tensors as ``_Ptr``)."""

    tag: str  # scenario/op/launch-index
    kernel: Any  # JITFunction or Autotuner
    args: tuple
    kwargs: dict

    @property
    def fn(self) -> Any:
        from triton.runtime.autotuner import Autotuner

        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    def configs(self, arch: int) -> list[Any]:
        """The autotune configs for the target (those the kernel's ``configs_for(dtype, arch)``
        keeps, if it has one, as its pruning does at run time); one ``None`` for a plain launch."""
        from triton.runtime.autotuner import Autotuner

        if not isinstance(self.kernel, Autotuner):
            return [None]
        configs_for = getattr(self.kernel, "configs_for", None)
        if configs_for is None:
            return list(self.kernel.configs)
        return configs_for(next(getattr(a, "base", a).dtype for a in self.args if isinstance(getattr(a, "base", a), _Ptr)), arch)

    @property
    def name(self) -> str:
        return f"{self.fn.__name__.strip('_').removesuffix('_kernel')}[{self.tag}]"


def _wrap(arg: Any) -> Any:
    """A launch argument as recorded: tensors (also a tensor descriptor's base) as ``_Ptr``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(arg, torch.Tensor):
        return _Ptr(arg)
    if isinstance(arg, TensorDescriptor):
        return TensorDescriptor(_Ptr(arg.base), list(arg.shape), list(arg.strides), list(arg.block_shape), arg.padding)
    return arg


@contextlib.contextmanager
def _recording(out: list[Launch], scenario: str) -> Iterator[None]:
    """Captures every kernel launch (instead of running it) and runs each ``flora_triton`` custom
    op's implementation (instead of its fake) while active; launchers size splits for BENCH_SMS."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import jit

    from flora_kernels.backends.triton import _common

    state = {"op": "", "count": 0}

    def getitem(kernel: Any, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            state["count"] += 1
            wrapped = tuple(_wrap(a) for a in args)
            out.append(Launch(f"{scenario}/{state['op']}.{state['count']}", kernel, wrapped, dict(kwargs)))

        return launch

    class RunImpls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func._schema.name
            if not name.startswith("flora_triton::"):
                return func(*args, **(kwargs or {}))
            state["op"], state["count"] = name.split("::")[1], 0
            return OPDEFS[name]._init_fn(*args, **(kwargs or {}))

    def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:  # torch has no autocast state for meta
        return saved_autocast("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    saved = jit.KernelInterface.__getitem__, _common.num_programs_target, torch.autocast
    saved_autocast = saved[2]
    jit.KernelInterface.__getitem__ = getitem  # type: ignore[method-assign]
    _common.num_programs_target = lambda device: 2 * BENCH_SMS
    torch.autocast = autocast  # type: ignore[assignment,misc]
    try:
        with RunImpls():
            yield
    finally:
        jit.KernelInterface.__getitem__, _common.num_programs_target, torch.autocast = saved  # type: ignore[method-assign,misc]


def _leaf(*shape: int, dtype: torch.dtype, grad: bool = False, fmt: torch.memory_format = torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt).requires_grad_(grad)


def _train_step(fn: Callable[..., torch.Tensor], inputs: list[Any]) -> None:
    y = fn(*inputs)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(y, wrt, torch.empty_like(y))


def _backend() -> Any:
    """The Triton backend, as the merged path (``backends.merged``) calls it."""
    from flora_kernels.backends.triton import TritonBackend

    return TritonBackend()


def _linear(strategy: str, p: float, gemm: str = "tiled", t: int = 8192) -> Callable[[torch.dtype], None]:
    def run(dt: torch.dtype) -> None:
        from flora_kernels.backends import merged
        from flora_kernels.backends.triton import linear

        d_in, d_out, r = 4096, 4096, 16
        x, w = _leaf(t, d_in, dtype=dt, grad=True), _leaf(d_out, d_in, dtype=dt)
        bias = _leaf(d_out, dtype=dt, grad=p > 0)  # the dropout step also trains the bias (ds_db's dbias column)
        core, u_out, u_in = _leaf(r, r, dtype=dt, grad=True), _leaf(d_out, r, dtype=dt, grad=True), _leaf(d_in, r, dtype=dt, grad=True)
        fn = (functools.partial(linear.linear_factorized, gemm=gemm) if strategy == "factorized"
              else functools.partial(merged.linear, _backend()))
        _train_step(lambda *a: fn(a[0], a[1], a[2], a[3], [a[4], a[5]], 2.0, p), [x, w, bias, core, u_out, u_in])

    return run


def _conv(strategy: str, p: float, k: int, groups: int, ranks: tuple[int, int], variant: str | None = None,
          nchw: tuple[int, int, int] = (64, 256, 56)) -> Callable[[torch.dtype], None]:
    def run(dt: torch.dtype) -> None:
        from flora_kernels.backends import merged
        from flora_kernels.backends.triton import conv
        from flora_kernels.convspec import ConvSpec

        (n, c, hw), cl = nchw, torch.channels_last
        x = _leaf(n, c, hw, hw, dtype=dt, grad=True, fmt=cl)
        w, bias = _leaf(c, c // groups, k, k, dtype=dt, fmt=cl), _leaf(c, dtype=dt)
        core = _leaf(*ranks, k, k, dtype=dt, grad=True)
        fs = [_leaf(c, ranks[0], dtype=dt, grad=True), _leaf(c // groups, ranks[1], dtype=dt, grad=True),
              _leaf(k, k, dtype=dt, grad=True), _leaf(k, k, dtype=dt, grad=True)]
        spec = ConvSpec((1, 1), ((k // 2, k // 2),) * 2, (1, 1), groups, "zeros")
        fn = (functools.partial(conv.conv_factorized, variant=variant or "cudnn") if strategy == "factorized"
              else functools.partial(merged.conv, _backend()))
        _train_step(lambda *a: fn(a[0], a[1], a[2], a[3], list(a[4:]), 2.0, spec, p), [x, w, bias, core, *fs])

    return run


#: name -> what runs: a training step (forward + every gradient but the frozen weight's).
SCENARIOS: dict[str, Callable[[torch.dtype], None]] = {
    "linear": _linear("factorized", 0.0),
    "linear-dropout": _linear("factorized", 0.1),
    "linear-merged": _linear("merged", 0.0),
    "linear-tma": _linear("factorized", 0.0, "tma"),
    "linear-dropout-tma": _linear("factorized", 0.1, "tma"),
    "linear-dropout-t512": _linear("factorized", 0.1, t=512),  # split-K shrink, S summed in the GEMM
    "linear-dropout-t512-tma": _linear("factorized", 0.1, "tma", t=512),
    "conv3x3": _conv("factorized", 0.0, 3, 1, (16, 16)),
    "conv3x3-dropout": _conv("factorized", 0.1, 3, 1, (16, 16)),
    "conv3x3-merged": _conv("merged", 0.0, 3, 1, (16, 16)),
    "conv3x3-igemm": _conv("factorized", 0.0, 3, 1, (16, 16), "igemm", (8, 64, 28)),
    "conv3x3-igemm-dropout": _conv("factorized", 0.1, 3, 1, (16, 16), "igemm", (8, 64, 28)),
    "conv3x3-igemm-g2-dropout": _conv("factorized", 0.1, 3, 2, (16, 16), "igemm", (8, 64, 28)),
    "dw7x7": _conv("factorized", 0.0, 7, 256, (16, 1)),
    "dw7x7-merged": _conv("merged", 0.0, 7, 256, (16, 1)),
}


def record(scenario: str, dtype: torch.dtype) -> list[Launch]:
    """Every kernel launch of one scenario's training step in ``dtype``, in launch order."""
    out: list[Launch] = []
    with _recording(out, scenario):
        SCENARIOS[scenario](dtype)
    return out


# ----------------------------------------------------------------------------- compiling


@dataclass
class Job:
    launch: Launch
    config: Any  # triton.Config or None
    dtype: str
    arch: int


@dataclass
class Result:
    line: str
    ok: bool
    seconds: float


def _bind(job: Job) -> tuple[Any, dict, dict, dict, Any]:
    """Triton's runtime specialisation of the launch for the job's target: (fn, signature,
    constexprs, attrs, options), as ``JITFunction.run`` computes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = job.launch.fn
    backend = make_backend(GPUTarget("cuda", job.arch, 32))
    kwargs = {**job.launch.kwargs, **(job.config.all_kwargs() if job.config is not None else {})}
    if job.config is not None and job.config.pre_hook is not None:  # e.g. tensor descriptors' block shapes
        job.config.pre_hook({**dict(zip(fn.arg_names, job.launch.args)), **kwargs})
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*job.launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return fn, signature, constexprs, attrs, options


def config_name(job: Job) -> str:
    """Block sizes, warps and stages: the autotune config's, else the launch's int constexprs."""
    if job.config is not None:
        kv, warps, stages = job.config.kwargs, job.config.num_warps, job.config.num_stages
    else:
        kv = {k: v for k, v in job.launch.kwargs.items() if k.startswith("B") and type(v) is int}
        warps, stages = job.launch.kwargs.get("num_warps", 4), job.launch.kwargs.get("num_stages", 3)
    return "-".join([*(f"{k}{v}" for k, v in kv.items()), f"w{warps}", f"s{stages}"])


_PTXAS_RE = re.compile(r"Used (\d+) registers.*?(\d+) bytes spill stores, (\d+) bytes spill loads", re.DOTALL)
_PTXAS_RE2 = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.DOTALL)


def parse_ptxas(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a ``ptxas -v`` log."""
    m = _PTXAS_RE.search(log)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = _PTXAS_RE2.search(log)
    if m:
        return int(m.group(3)), int(m.group(1)), int(m.group(2))
    raise ValueError(f"no register/spill report in the ptxas log: {log[:300]!r}")


def _ptxas_report(ptx: str, arch: int) -> str:
    """Runs triton's ptxas -v on ``ptx`` (when the compile came from triton's cache)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(d, "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def verdict(spill_stores: int, spill_loads: int, smem: int, arch: int) -> str:
    """"ok", or why the kernel fails the check."""
    bad = []
    if spill_stores or spill_loads:
        bad.append("SPILLS")
    if smem > smem_limit(arch):
        bad.append(f"SMEM>{smem_limit(arch)}")
    return "+".join(bad) if bad else "ok"


def compile_job(job: Job) -> Result:
    """Compile one job and report it (never raises: a compile error is a failing line)."""
    import triton
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    head = f"{job.launch.name} {config_name(job)} {job.dtype}"
    target = sm_arch_from_capability(job.arch)
    try:
        fn, signature, constexprs, attrs, options = _bind(job)
        buf = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                target=triton.backends.compiler.GPUTarget("cuda", job.arch, 32),
                                options=options.__dict__)
        log = buf.getvalue()
        if "spill stores" not in log:  # served from triton's cache: ptxas did not run
            log = _ptxas_report(ck.asm["ptx"], job.arch)
        regs, stores, loads = parse_ptxas(log)
        smem = int(ck.metadata.shared)
    except Exception as e:  # noqa: BLE001 - every job is reported; the exit status fails the run
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = " | ".join(lines[:1] + lines[-2:])[:400]
        return Result(f"{head} regs=- spills=- smem=- {target} ERROR {type(e).__name__}: {msg}", False,
                      time.perf_counter() - t0)
    v = verdict(stores, loads, smem, job.arch)
    return Result(f"{head} regs={regs} spills={stores} smem={smem} {target} spill_loads={loads} {v}", v == "ok",
                  time.perf_counter() - t0)


def _specialisation_key(job: Job) -> str:
    fn, signature, constexprs, attrs, options = _bind(job)
    return repr((fn.__name__, signature, sorted(constexprs.items(), key=str), sorted(attrs.items(), key=str),
                 sorted(options.__dict__.items(), key=str), job.dtype, job.arch))


def plan(scenarios: list[str], dtypes: list[str], archs: list[int], all_configs: bool,
         kernels: list[str] | None = None) -> list[Job]:
    """The distinct (specialisation, config, dtype, target) jobs of the scenarios' launches; a
    kernel variant launched by several scenarios is compiled once, named after the first."""
    jobs: list[Job] = []
    seen: set[str] = set()
    for dtype in dtypes:
        for scenario in scenarios:
            for launch in record(scenario, _DTYPES[dtype]):
                if kernels and not any(k in launch.name for k in kernels):
                    continue
                for arch in archs:
                    configs = launch.configs(arch)
                    skip = (launch.fn.__name__, dtype, arch,
                            getattr(launch.kernel, "no_configs_reason", "no configs for this target"))
                    if not configs and skip not in _SKIPPED:
                        _SKIPPED.append(skip)
                    for cfg in configs if all_configs else configs[:1]:
                        job = Job(launch, cfg, dtype, arch)
                        key = _specialisation_key(job)
                        if key not in seen:
                            seen.add(key)
                            jobs.append(job)
    return jobs


_JOBS: list[Job] = []
#: (kernel, dtype, arch, why) that ``plan`` found no configs for (a kernel for newer targets only).
_SKIPPED: list[tuple[str, str, int, str]] = []


def _run_index(i: int) -> Result:
    return compile_job(_JOBS[i])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config (default: the first)")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--dtypes", nargs="+", default=list(_DTYPES), choices=list(_DTYPES))
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--kernels", nargs="+", help="only kernels whose name contains one of these")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    for a in args.arch:
        smem_limit(a)
    t0 = time.perf_counter()
    global _JOBS
    _JOBS = plan(args.scenarios, args.dtypes, args.arch, args.all_configs, args.kernels)
    print(f"# {len(_JOBS)} compiles ({len(args.scenarios)} scenarios, dtypes {' '.join(args.dtypes)}, "
          f"sm {' '.join(map(str, args.arch))}, {'all configs' if args.all_configs else 'first config'})", flush=True)
    for name, dtype, arch, why in _SKIPPED:
        print(f"# skipped {name} {dtype} sm_{arch}: {why}", flush=True)
    failed = 0
    if args.jobs > 1 and len(_JOBS) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = pool.map(_run_index, range(len(_JOBS)))
            for r in results:
                failed += not r.ok
                print(r.line, flush=True)
    else:
        for job in _JOBS:
            r = compile_job(job)
            failed += not r.ok
            print(r.line, flush=True)
    print(f"# {len(_JOBS) - failed} ok, {failed} failing, {time.perf_counter() - t0:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
