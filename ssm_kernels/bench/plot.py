"""Throughput against width from a pytest-benchmark results file (`--benchmark-json`)."""

import json
import math
from collections import defaultdict

MODE_ORDER = ("fwd", "bwd", "fwdbwd")
SHAPE_KEYS = ("batch", "seqlen", "d_state", "dtype")


REQUIRED = ("d_inner", "mode", "backend", "multipliers")


def load_results(path):
    """The benchmarks of a results file that carry our extra_info, with gbps recomputed if absent.
    ValueError (naming the file and the benchmark) for anything that is not such a file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
        raise ValueError(f"{path}: expected a pytest-benchmark results object {{\"benchmarks\": [...]}}, got "
                         f"{type(data).__name__}")
    rows = []
    for i, bench in enumerate(data.get("benchmarks", [])):
        info = dict(bench.get("extra_info", {})) if isinstance(bench, dict) else {}
        if "d_inner" not in info or "mode" not in info:
            continue  # another benchmark of the suite (packing, decode, transformers)
        name = bench.get("name", f"benchmark {i}")
        median = (bench.get("stats") or {}).get("median")
        if info.get("gbps") is None and median is not None and info.get("bytes"):
            if not median > 0:
                raise ValueError(f"{path}: {name}: median time {median} is not positive")
            info["gbps"] = info["bytes"] / median / 1e9
        if info.get("gbps") is None:
            continue  # run with --benchmark-disable: nothing was timed
        missing = [k for k in REQUIRED if k not in info]
        if missing:
            raise ValueError(f"{path}: {name}: extra_info lacks {missing}")
        if info["mode"] not in MODE_ORDER:
            raise ValueError(f"{path}: {name}: unknown mode {info['mode']!r} (expected one of {MODE_ORDER})")
        rows.append(info)
    if not rows:
        raise ValueError(f"{path}: no timed selective-scan benchmarks (was it written by `pytest benchmarks/ "
                         "--benchmark-json=...` without --benchmark-disable?)")
    return rows


def plot_results(path, out_png, title=None):
    """One panel per mode: GB/s against d_inner (log2), a line per backend x multipliers (x shape when
    the file holds several), and the device's peak bandwidth as the roofline when it is known."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_results(path)
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]
    shapes = sorted({tuple(r.get(k) for k in SHAPE_KEYS) for r in rows}, key=str)
    devices = sorted({r.get("device", "?") for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        lines = defaultdict(dict)
        for r in rows:
            if r["mode"] != mode:
                continue
            label = f"{r['backend']} / {r['multipliers']}"
            if len(shapes) > 1:
                label += " (" + ", ".join(f"{k} {r.get(k)}" for k in SHAPE_KEYS) + ")"
            lines[label][r["d_inner"]] = r["gbps"]
        for label in sorted(lines):
            widths = sorted(lines[label])
            ax.plot(widths, [lines[label][w] for w in widths], marker="o", label=label)
        peaks = {r.get("peak_bandwidth_gbps") for r in rows if r["mode"] == mode} - {None}
        for peak in peaks:
            ax.axhline(peak, color="black", linestyle="--", linewidth=1, label=f"roofline: peak HBM {peak:g} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_inner")
        ax.set_ylabel("GB/s (minimal bytes moved / median time)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    shape = "; ".join(", ".join(f"{k} {v}" for k, v in zip(SHAPE_KEYS, s)) for s in shapes) if len(shapes) == 1 else ""
    fig.suptitle(title or f"selective scan on {', '.join(devices)}" + (f" ({shape})" if shape else ""))
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def summary_table(path):
    """Median ms and GB/s per (mode, d_inner, backend, multipliers), as text lines."""
    rows = sorted(load_results(path), key=lambda r: (MODE_ORDER.index(r["mode"]), r["d_inner"], r["backend"],
                                                     r["multipliers"]))
    lines = [f"{'mode':<7} {'d_inner':>7} {'backend':<9} {'multipliers':<11} {'GB/s':>9} {'peak MiB':>9}"]
    for r in rows:
        mib = r.get("peak_mem_bytes", math.nan) / 2**20
        lines.append(f"{r['mode']:<7} {r['d_inner']:>7} {r['backend']:<9} {r['multipliers']:<11} "
                     f"{r['gbps']:>9.3g} {mib:>9.1f}")
    return lines
