"""Reports of a result document: stdout table, JSON, CSV, Markdown, plot, target verdicts.

The result document (``harness.run``) holds:

- ``meta``: date, device and its name, CPU model, versions, git commit, machine load, elapsed;
- ``config``: shapes, providers, modes, repetition budget, timing method, tolerances;
- ``backends``: ``fk.available_backends()``;
- ``shapes``: per shape its description, ranks, the cost model's auto plan (train / infer)
  and, per provider that ran, what it is (``impl``);
- ``checks``: per (shape, provider) the correctness status and every relative error;
- ``rows``: per (shape, provider, mode) median/p20/p80 ms, ratio to the base (median of
  per-round ratios, with its 20/80 quantiles), counted FLOPs/bytes, TFLOP/s, GB/s, memory;
- ``skipped``: (shape, provider, mode, reason) for everything not run;
- ``verdicts``: the docs/ARCHITECTURE.md, Performance targets targets evaluated on this run (``verdicts()``);
- ``host_path`` (``--quick``): the short host-path case (``flora_bench.hostpath``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable

from .counts import MODES

ROW_FIELDS = (
    "date_utc",
    "device_name",
    "shape",
    "op",
    "dtype",
    "provider",
    "mode",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "ratio",
    "ratio_p20",
    "ratio_p80",
    "ratio_of_medians",
    "flops",
    "bytes",
    "tflops",
    "gbps",
    "peak_mib",
    "saved_mib",
    "check",
    "impl",
    "git_commit",
)

# docs/ARCHITECTURE.md, Performance targets targets, as (provider family, op, mode) -> max ratio to the frozen base.
GPU_TARGETS = {("linear", "full"): 1.08, ("conv", "full"): 1.15, ("linear", "infer"): 1.05, ("conv", "infer"): 1.10}
MERGED_TARGET = 1.03  # "merged = 1.00", with 3% for timing noise
CPU_CONV_FACTORIZED_TARGET = 1.3


def _fmt_ratio(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _status(v: dict) -> str:
    return v.get("status") or ("PASS" if v["ok"] else "MISS")


def _fmt_err(v: float | str) -> str:
    return f"{v:.1e}" if isinstance(v, (int, float)) else str(v)


def _by_key(result: dict) -> dict[tuple[str, str, str], dict]:
    return {(r["shape"], r["provider"], r["mode"]): r for r in result["rows"]}


def _providers_in_order(result: dict) -> list[str]:
    seen: OrderedDict[str, None] = OrderedDict()
    for p in result["config"]["providers"]:
        if any(r["provider"] == p for r in result["rows"]) or any(c["provider"] == p for c in result["checks"]):
            seen[p] = None
    return list(seen)


def _check_text(result: dict, shape: str, provider: str) -> str:
    for c in result["checks"]:
        if c["shape"] == shape and c["provider"] == provider:
            if c["status"] == "ok":
                return f"ok {c['max_error']:.0e}"
            if c["status"] == "floor":
                return "floor"
            return "FAIL"
    return "-"


def _skip_groups(result: dict) -> list[tuple[str, str, str]]:
    """(providers, where, reason): skips with one reason merged, e.g. the three strategies of
    an unavailable backend, or every provider cut by --max-minutes."""
    all_shapes = [s["name"] for s in result["shapes"]] + [
        s["shape"] for s in result["skipped"] if s["shape"] not in {x["name"] for x in result["shapes"]}
    ]
    groups: OrderedDict[str, dict[str, list[str]]] = OrderedDict()
    for s in result["skipped"]:
        g = groups.setdefault(s["reason"], {"providers": [], "shapes": [], "modes": []})
        for k, v in (("providers", s["provider"]), ("shapes", s["shape"]), ("modes", s["mode"])):
            if v not in g[k]:
                g[k].append(v)
    out = []
    for reason, g in groups.items():
        where = "all shapes" if set(g["shapes"]) >= set(all_shapes) else ", ".join(g["shapes"])
        if "*" not in g["modes"]:
            where += "; modes " + ", ".join(g["modes"])
        out.append((", ".join(g["providers"]), where, reason))
    return out


def table(result: dict) -> str:
    """The plain stdout table: per shape, every provider's ratio to the frozen base per mode,
    the training step's median time and the correctness column."""
    rows = _by_key(result)
    modes = [m for m in MODES if m in result["config"]["modes"]]
    provs = _providers_in_order(result)
    width = max([len(p) for p in provs] + [8])
    out = []
    m = result["meta"]
    out.append(
        f"flora-bench on {m['device_name']} | torch {m['torch']} | {m['date_utc']} | "
        f"load avg {m.get('loadavg_start')} -> {m.get('loadavg_end')}"
    )
    out.append(
        "ratio = median over interleaved rounds of (provider time / frozen base time in that round); lower is better"
    )
    time_mode = "full" if "full" in modes else modes[0]
    for sd in result["shapes"]:
        name = sd["name"]
        plan = sd["auto_plan"]
        out.append("")
        out.append(
            f"{name}: {sd['description']}  "
            f"[auto picks: train={plan['train']['strategy']}, infer={plan['infer']['strategy']}]"
        )
        head = f"  {'provider':<{width}} " + " ".join(f"{md:>7}" for md in modes) + f" {time_mode + ' ms':>10}  check"
        out.append(head)
        for p in provs:
            if not any((name, p, md) in rows for md in modes) and _check_text(result, name, p) in ("-",):
                continue
            cells = " ".join(f"{_fmt_ratio(rows.get((name, p, md), {}).get('ratio')):>7}" for md in modes)
            ms = rows.get((name, p, time_mode), {}).get("median_ms")
            out.append(f"  {p:<{width}} {cells} {_fmt_ms(ms):>10}  {_check_text(result, name, p)}")
    groups = _skip_groups(result)
    if groups:
        out.append("")
        out.append("skipped:")
        for provs_, where, reason in groups:
            out.append(f"  {provs_} ({where}): {reason}")
    fails = [c for c in result["checks"] if c["status"] == "FAIL"]
    if fails:
        out.append("")
        out.append("FAILED correctness checks:")
        out += [f"  {c.get('message', c['provider'])}" for c in fails]
    v = result.get("verdicts") or []
    if v:
        out.append("")
        out.append("targets (docs/ARCHITECTURE.md, Performance targets):")
        out += [f"  [{_status(x)}] {x['text']}" for x in v]
    for n in result.get("notes", []):
        out.append(f"note: {n}")
    out += _host_section(result)
    out.append(f"elapsed {result['meta'].get('elapsed_s', 0):.0f} s")
    return "\n".join(out)


def _host_section(result: dict) -> list[str]:
    """The short host-path case of ``--quick`` (``flora_bench.hostpath``), when it ran."""
    if not result.get("host_path"):
        return []
    from .hostpath import markdown as host_markdown

    return ["", host_markdown(result["host_path"])]


class _Verdicts:
    """The verdicts of one result document, shape by shape (``verdicts``)."""

    def __init__(self, result: dict) -> None:
        self.rows = _by_key(result)
        self.out: list[dict] = []

    def add(self, ok: bool, text: str, **kw) -> None:
        """A verdict; "noise" when the value is within this run's timing noise of its target
        (the spread of base-again around 1, scaled to the target)."""
        noise = kw.pop("noise", None)
        status = "PASS" if ok else "MISS"
        if noise is not None and abs(kw["value"] - kw["target"]) <= noise * kw["target"]:
            status = f"NOISE {status}"
            text += f" [within this run's noise: base-again off by {noise * 100:.0f}%]"
        self.out.append({"ok": bool(ok), "status": status, "text": text, **kw})

    def noise_of(self, shape: str, mode: str) -> float | None:
        r = self.rows.get((shape, "base-again", mode))
        return None if r is None else abs(r["ratio"] - 1.0)

    def vs_paper(self, name: str, p: str, r: dict, paper: dict, noise: float | None, medians: bool) -> None:
        """FLoRA's training step against the paper's formula's."""
        text = f"{name}: {p} training step {r['ratio']:.2f}x vs paper formula {paper['ratio']:.2f}x"
        if medians:
            text += f" (medians: {r['median_ms']:.1f} ms vs {paper['median_ms']:.1f} ms)"
        self.add(r["ratio"] < paper["ratio"], text, shape=name, provider=p, value=r["ratio"], target=paper["ratio"],
                 noise=noise)

    def cpu(self, sd: dict, flora: list[str]) -> None:
        """CPU targets: the factorized conv's training step, and never slower than the paper's formula."""
        name = sd["name"]
        paper = self.rows.get((name, "paper-formula", "full"))
        pick = sd["auto_plan"]["train"]["strategy"]
        for p in flora:
            r = self.rows.get((name, p, "full"))
            if r is None:
                continue
            if sd["op"] == "conv" and p.endswith("-factorized"):
                self.add(
                    r["ratio"] <= CPU_CONV_FACTORIZED_TARGET,
                    f"{name}: {p} training step {r['ratio']:.2f}x base "
                    f"(target <= {CPU_CONV_FACTORIZED_TARGET}; auto picks {pick})",
                    shape=name, provider=p, value=r["ratio"], target=CPU_CONV_FACTORIZED_TARGET,
                    noise=self.noise_of(name, "full"),
                )
            if paper is not None and p.endswith(("-factorized", "-auto")):
                self.vs_paper(name, p, r, paper, self.noise_of(name, "full"), medians=True)

    def best(self, name: str, providers: list[str], mode: str) -> dict | None:
        cands = [self.rows[(name, p, mode)] for p in providers if (name, p, mode) in self.rows]
        return min(cands, key=lambda r: r["ratio"]) if cands else None

    def gpu(self, sd: dict, autos: list[str]) -> None:
        """GPU targets: the best auto provider's training step / inference / merged inference,
        and never slower than the paper's formula."""
        name = sd["name"]
        for mode in ("full", "infer"):
            tgt, best = GPU_TARGETS.get((sd["op"], mode)), self.best(name, autos, mode)
            if tgt is not None and best is not None:
                self.add(best["ratio"] <= tgt,
                         f"{name}: best FLoRA ({best['provider']}) {mode} {best['ratio']:.3f}x base (target <= {tgt})",
                         shape=name, provider=best["provider"], value=best["ratio"], target=tgt)
        best = self.best(name, autos, "merged")
        if best is not None:
            self.add(best["ratio"] <= MERGED_TARGET,
                     f"{name}: merged inference ({best['provider']}) {best['ratio']:.3f}x base "
                     f"(target 1.00, noise allowance {MERGED_TARGET})",
                     shape=name, provider=best["provider"], value=best["ratio"], target=MERGED_TARGET)
        paper = self.rows.get((name, "paper-formula", "full"))
        for p in autos:
            r = self.rows.get((name, p, "full"))
            if paper is not None and r is not None:
                self.vs_paper(name, p, r, paper, None, medians=False)


def verdicts(result: dict) -> list[dict]:
    """docs/ARCHITECTURE.md, Performance targets targets on this run's rows (ratios to the base, training step = full)."""
    v = _Verdicts(result)
    flora = [p for p in result["config"]["providers"] if p.startswith("flora-")]
    for sd in result["shapes"]:
        if result["config"]["device"] == "cpu":
            v.cpu(sd, flora)
        else:
            v.gpu(sd, [p for p in flora if p.endswith("-auto")])
    return v.out


def write_json(result: dict, path: str) -> None:
    _mkdir(path)
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=1, default=str)
        f.write("\n")


def _clean(o: object) -> object:
    """Strict JSON: non-finite floats become the strings "inf"/"nan"."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_csv(result: dict, path: str, append: bool = True) -> None:
    """One line per (shape, provider, mode); appended (header written for a new file)."""
    _mkdir(path)
    new = not (append and os.path.exists(path) and os.path.getsize(path) > 0)
    m = result["meta"]
    commit = (m.get("git") or {}).get("commit", "")
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in result["rows"]:
            w.writerow({**r, "date_utc": m["date_utc"], "device_name": m["device_name"], "git_commit": commit})


def _md_header(result: dict, modes: list[str]) -> list[str]:
    """What the run was measured on, its configuration, notes and target verdicts."""
    m, c = result["meta"], result["config"]
    git = m.get("git") or {}
    lines = [
        f"# flora-bench: {m['device_name']}",
        "",
        f"- date (UTC): {m['date_utc']}; elapsed {m.get('elapsed_s', 0):.0f} s",
        (
            f"- device: `{m['device']}`, {m['device_name']}; CPU model: {m['cpu_model']}, "
            f"{m['cpu_count']} logical CPUs, torch threads {m['torch_threads']}"
        ),
        f"- load average (1/5/15 min) at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}",
        (
            f"- versions: flora_kernels {m['flora_kernels']}, torch {m['torch']} (CUDA {m['torch_cuda']}), "
            f"triton {m['triton']}, peft {m['peft']}, Python {m['python']}"
        ),
        f"- git: {git.get('commit', 'n/a')}"
        + (f" (+{git['dirty_files']} modified tracked files)" if git.get("dirty_files") else ""),
        f"- config: quick={c['quick']}, modes {', '.join(modes)}, budget {c['budget']}, timing: {c['timing']}",
        "- backends: " + ", ".join(f"{k}: {v}" for k, v in result["backends"].items()),
        "",
        (
            "Ratio = median over interleaved rounds of (provider time / frozen base time in the same round); "
            "[p20-p80] of those per-round ratios. Training step = `full` (forward + dx + adapter grads, base frozen)."
        ),
        "",
    ]
    if result.get("notes"):
        lines += [f"- note: {n}" for n in result["notes"]] + [""]
    v = result.get("verdicts") or []
    if v:
        lines += ["## Targets (docs/ARCHITECTURE.md, Performance targets)", ""]
        lines += [f"- **{_status(x)}** {x['text']}" for x in v] + [""]
    return lines


def _md_ratios(result: dict, modes: list[str]) -> list[str]:
    """Per shape: every provider's ratio to the frozen base per mode, the training step's time, the check."""
    rows = _by_key(result)
    provs = _providers_in_order(result)
    lines = ["## Ratio to the frozen base", ""]
    for sd in result["shapes"]:
        plan = sd["auto_plan"]
        lines += [
            f"### {sd['name']}",
            "",
            (
                f"{sd['description']}. {sd['note']}. Auto plan: train={plan['train']['strategy']} "
                f"(factorized ~{plan['train']['factorized_us']:.0f} us vs merged ~{plan['train']['merged_us']:.0f} us), "
                f"infer={plan['infer']['strategy']}."
            ),
            "",
            "| provider | " + " | ".join(modes) + " | full ms | check |",
            "|---|" + "---:|" * len(modes) + "---:|---|",
        ]
        for p in provs:
            if not any((sd["name"], p, md) in rows for md in modes):
                continue
            cells = []
            for md in modes:
                r = rows.get((sd["name"], p, md))
                cells.append(
                    "-"
                    if r is None
                    else f"{_fmt_ratio(r['ratio'])} [{_fmt_ratio(r['ratio_p20'])}-{_fmt_ratio(r['ratio_p80'])}]"
                )
            ms = rows.get((sd["name"], p, "full"), {}).get("median_ms")
            lines.append(f"| {p} | " + " | ".join(cells) + f" | {_fmt_ms(ms)} | {_check_text(result, sd['name'], p)} |")
        lines.append("")
        impls = sd.get("providers", {})
        if impls:
            lines += ["Providers: " + "; ".join(f"`{k}`: {v}" for k, v in impls.items()), ""]
    return lines


def _md_figures(result: dict) -> list[str]:
    """Every row: times, ratio, TFLOP/s, GB/s, memory."""
    lines = [
        "## Every figure",
        "",
        "| shape | provider | mode | median ms | p20 | p80 | reps | ratio | TFLOP/s | GB/s | peak MiB | saved MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        saved = "-" if r["saved_mib"] is None else f"{r['saved_mib']:.2f}"
        lines.append(
            f"| {r['shape']} | {r['provider']} | {r['mode']} | {_fmt_ms(r['median_ms'])} | {_fmt_ms(r['p20_ms'])} | "
            f"{_fmt_ms(r['p80_ms'])} | {r['reps']} | {_fmt_ratio(r['ratio'])} | {r['tflops']:.3f} | "
            f"{r['gbps']:.1f} | {peak} | {saved} |"
        )
    lines += [
        "",
        (
            "FLOPs and bytes are counted per `flora_bench/counts.py` (the layer's useful work, "
            "the same for every adapted provider)."
        ),
        "",
    ]
    return lines


def _md_skips_and_checks(result: dict) -> list[str]:
    """What did not run (grouped by reason) and every correctness check."""
    lines = []
    groups = _skip_groups(result)
    if groups:
        lines += ["## Skipped", ""]
        lines += [f"- {provs_} ({where}): {reason}" for provs_, where, reason in groups]
        lines.append("")
    lines += ["## Correctness (relative error against the float64 reference path)", ""]
    for ck in result["checks"]:
        errs = ", ".join(f"{k} {_fmt_err(v)}" for k, v in ck["errors"].items())
        lines.append(
            f"- {ck['shape']} / {ck['provider']}: **{ck['status']}**"
            + (f" (tol {ck['tol']:.0e}): {errs}" if errs else "")
            + (f" — {ck['message']}" if ck.get("message") else "")
        )
    lines.append("")
    return lines


def markdown(result: dict) -> str:
    """The result document as a Markdown report."""
    modes = [md for md in MODES if md in result["config"]["modes"]]
    lines = _md_header(result, modes) + _md_ratios(result, modes) + _md_figures(result)
    return "\n".join(lines + _md_skips_and_checks(result) + _host_section(result))


def write_markdown(result: dict, path: str) -> None:
    _mkdir(path)
    with open(path, "w") as f:
        f.write(markdown(result))


def plot(result: dict, path: str, modes: Iterable[str] | None = None) -> None:
    """Ratio to the frozen base per provider and shape (one panel per mode, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _by_key(result)
    modes = [md for md in (modes or MODES) if md in result["config"]["modes"]]
    shapes = [s["name"] for s in result["shapes"]]
    provs = [p for p in _providers_in_order(result) if p != "base"]
    if not shapes or not modes or not provs:
        return
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(8, 1.6 * len(shapes) * max(1, len(provs)) / 4), 3.2 * len(modes)), squeeze=False
    )
    cmap = plt.get_cmap("tab20")
    width = 0.8 / len(provs)
    for ax, md in zip(axes[:, 0], modes):
        for j, p in enumerate(provs):
            xs, ys, lo, hi = [], [], [], []
            for i, s in enumerate(shapes):
                r = rows.get((s, p, md))
                if r is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r["ratio"])
                lo.append(max(r["ratio"] - r["ratio_p20"], 0))
                hi.append(max(r["ratio_p80"] - r["ratio"], 0))
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=p, color=cmap(j % 20), capsize=1.5, linewidth=0)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{md}: time / base")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper left")
    m = result["meta"]
    axes[0, 0].set_title(
        f"flora-bench, {m['device_name']}, {m['date_utc']} (lower is better; 1 = frozen base)", fontsize=9
    )
    fig.tight_layout()
    _mkdir(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(result: dict, baseline: dict, threshold: float = 0.10) -> list[str]:
    """Regression check: (shape, provider, mode) whose ratio to base grew by more than
    ``threshold`` (relative) against ``baseline``, a previous result document."""
    old = _by_key(baseline)
    out = []
    for key, r in _by_key(result).items():
        o = old.get(key)
        if o is not None and r["ratio"] > o["ratio"] * (1 + threshold):
            out.append(
                f"{key[0]} / {key[1]} / {key[2]}: ratio {o['ratio']:.3f} -> {r['ratio']:.3f} "
                f"(+{(r['ratio'] / o['ratio'] - 1) * 100:.0f}%)"
            )
    return out


def _mkdir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
