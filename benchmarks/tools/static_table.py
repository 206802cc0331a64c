"""The static H100 model of our kernels beside mamba_ssm's CUDA kernels, over many configurations.

No GPU needed. Our kernels are compiled for sm_90 exactly as the JIT would compile them
(benchmarks/tools/compile_for_gpu.py); mamba_ssm's selective-scan kernels are compiled with nvcc from a
fetched copy of its sources, which stay in the temporary --work folder; both are modeled by a
static GPU model that is not part of this repository (its folder: --static-gpu, or
$SSM_KERNELS_STATIC_GPU), which gives lower bounds and a latency-aware estimate in microseconds.

    python benchmarks/tools/static_table.py --static-gpu DIR [--configs default|all]
        [--mamba-git GITDIR --cuda-root DIR] [--json OUT] [--markdown OUT]

Without --mamba-git only our kernels are modeled. The model is not a stopwatch: real times are at
least its lower bounds, and only a GPU run says how close they come.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compile_for_gpu  # noqa: E402  (sets TRITON_INTERPRET=0 before triton loads)

BENCHMARK = dict(batch=4, dim=2048, seqlen=2048, d_state=16, dtype="bf16", fixed_bc=False)
# The grid: one change at a time from the benchmark configuration.
VARIATIONS = [dict(d_state=64), dict(d_state=256), dict(seqlen=512), dict(seqlen=8192), dict(dim=768),
              dict(dim=12288), dict(dtype="fp32"), dict(fixed_bc=True)]
# The widths of `pytest benchmarks/`'s CUDA grid (benchmarks/conftest.py), which the GPU session
# (benchmarks/gpu_session.py) puts beside its measured times.
BENCHMARK_WIDTHS = [768, 1536, 2048, 3072, 6144, 12288]
CUDA_TYPES = {"bf16": "at::BFloat16", "fp16": "at::Half", "fp32": "float"}


def configs(which):
    if which == "benchmark":
        return [dict(BENCHMARK)]
    if which == "widths":
        return [dict(BENCHMARK, dim=dim) for dim in BENCHMARK_WIDTHS]
    return [dict(BENCHMARK)] + [dict(BENCHMARK, **v) for v in VARIATIONS]


def config_name(cfg):
    return (f"{cfg['dtype']} b{cfg['batch']} d{cfg['dim']} L{cfg['seqlen']} N{cfg['d_state']} "
            f"{'fixed' if cfg['fixed_bc'] else 'variable'} B/C")


def load_model(static_gpu):
    sys.path.insert(0, static_gpu)
    import h100_model
    import sass_mix
    import static_model
    return h100_model, sass_mix, static_model


def model_ours(cfg, out_dir, tools):
    """Our kernels at this configuration, modeled by the shared tool's --from-dir path."""
    static_model = tools[2]
    records = {r["kernel"]: r for r in compile_for_gpu.compile_config(out_dir, **cfg)}
    with contextlib.redirect_stdout(io.StringIO()):
        estimates = static_model.model_dir(out_dir, None)
    result = {}
    for name, est in estimates.items():
        r = records[name]
        _add(result.setdefault(r["kind"], _empty()), est, dict(kernel=name, res_usage=r["res_usage"]))
    return result


def _empty():
    return dict(lower_bound_us=0.0, lower_bound_no_l1_us=0.0, latency_aware_us=0.0, loads_bytes_per_es=0.0,
                atomic_bytes_per_es=0.0, kernels=[])


def _add(entry, est, kernel):
    """Adds one kernel's estimate to a forward or backward entry (a launch's kernels run one after
    another: their times and their traffic per element-state add up)."""
    entry["lower_bound_us"] += est["lower_bound_s"] * 1e6
    entry["lower_bound_no_l1_us"] += est["lower_bound_no_l1_s"] * 1e6
    entry["latency_aware_us"] += est["latency_aware_s"] * 1e6
    entry["loads_bytes_per_es"] += est["traffic"]["ldg_bytes_per_es"]
    entry["atomic_bytes_per_es"] += est["traffic"]["atomic_bytes_per_es"]
    entry["kernels"].append(dict(kernel, regs=est["regs"], insns_per_es=est["per_es_thread_insns"]["total"],
                                 bound_by=est["lower_bound_by"]))


def model_mamba(cfg, out_dir, tools, src, cuda_root):
    """mamba_ssm's kernels at this configuration (real A, z, delta softplus, as in Mamba)."""
    h100_model, sass_mix, static_model = tools
    variable = "false" if cfg["fixed_bc"] else "true"
    T = CUDA_TYPES[cfg["dtype"]]
    static_model.MAMBA_INST = {
        "fwd": ("selective_scan_fwd_kernel.cuh",
                f"using KT = Selective_Scan_fwd_kernel_traits<{{T}}, {{I}}, 1, {{even}}, {variable}, {variable}, "
                f"true, {T}, float>;\n"
                "template __global__ void selective_scan_fwd_kernel<KT>(SSMParamsBase params);\n"),
        "bwd": ("selective_scan_bwd_kernel.cuh",
                f"using KT = Selective_Scan_bwd_kernel_traits<{{T}}, {{I}}, {{even}}, {variable}, {variable}, "
                f"true, true, {T}, float>;\n"
                "template __global__ void selective_scan_bwd_kernel<KT>(SSMParamsBwd params);\n"),
    }
    import torch
    metas = static_model.build_mamba(src, out_dir, cuda_root, os.path.join(os.path.dirname(torch.__file__), "include"),
                                     cfg)
    result = {}
    itemsize = compile_for_gpu.DTYPES[cfg["dtype"]].itemsize
    for kind, meta in metas.items():
        # the same minimal traffic as ours (mamba's forward also writes out_z; its saved states differ)
        hbm, l2 = compile_for_gpu.traffic(kind, cfg["batch"], cfg["dim"], cfg["seqlen"], cfg["d_state"], itemsize,
                                          cfg["fixed_bc"], meta["loop_trips"][0])
        est = h100_model.estimate(sass_mix.analyze(os.path.join(out_dir, f"mamba_{kind}.sass")), meta, hbm, l2)
        _add(result.setdefault(kind, _empty()), est, dict(kernel=meta["kernel"], spill=meta["spill"]))
    return result


def mamba_sources(git_dir, work):
    src = os.path.join(work, "mamba_src")
    if not os.path.isdir(src):
        os.makedirs(src)
        archive = subprocess.run(["git", "-C", git_dir, "archive", "HEAD", "csrc/selective_scan"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    return os.path.join(src, "csrc", "selective_scan")


def _cell(e):
    """LB / LB if L1 serves nothing / latency-aware (µs), loads + atomics (bytes per element-state)."""
    traffic = f"{e['loads_bytes_per_es']:.2f}"
    if e["atomic_bytes_per_es"]:
        traffic += f" + {e['atomic_bytes_per_es']:.2f}"
    return (f"{e['lower_bound_us']:.0f} / {e['lower_bound_no_l1_us']:.0f} / {e['latency_aware_us']:.0f} "
            f"({traffic})")


def markdown(rows, with_mamba):
    """One row per configuration; a cell: lower bound / lower bound if L1 serves nothing /
    latency-aware, in µs, then (loads + atomics) in bytes per element-state."""
    head = "| configuration | ours fwd | ours bwd |"
    rule = "|---|---|---|"
    if with_mamba:
        head += " mamba fwd | mamba bwd | no-L1 ratio fwd / bwd |"
        rule += "---|---|---|"
    lines = [head, rule]
    for row in rows:
        o = row["ours"]
        line = f"| {row['config']} | {_cell(o['fwd'])} | {_cell(o['bwd'])} |"
        if with_mamba:
            m = row["mamba"]
            ratios = " / ".join(f"{o[k]['lower_bound_no_l1_us'] / m[k]['lower_bound_no_l1_us']:.2f}"
                                for k in ("fwd", "bwd"))
            line += f" {_cell(m['fwd'])} | {_cell(m['bwd'])} | {ratios} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", choices=["benchmark", "all", "widths"], default="all",
                        help="benchmark: bf16 4 x 2048 x 2048 N16; all: it and one change at a time (N, L, dim, "
                        "dtype, fixed B/C); widths: the benchmark grid's widths")
    parser.add_argument("--deterministic", action="store_true", help="the backward's deterministic mode")
    parser.add_argument("--static-gpu", default=os.environ.get("SSM_KERNELS_STATIC_GPU"),
                        help="folder of the static GPU model, not part of this repository (default "
                        "$SSM_KERNELS_STATIC_GPU)")
    parser.add_argument("--mamba-git", help="git dir of a clone of state-spaces/mamba; needs --cuda-root")
    parser.add_argument("--cuda-root", help="folder with bin/nvcc (the CUDA toolkit)")
    parser.add_argument("--work", help="temporary folder (default: a new one)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    if not args.static_gpu or not os.path.isdir(args.static_gpu):
        parser.error(f"--static-gpu {args.static_gpu}: the static GPU model's folder is needed (not part of this "
                     "repository)")
    tools = load_model(os.path.abspath(args.static_gpu))
    work = args.work or tempfile.mkdtemp(prefix="static_table_")
    src = mamba_sources(args.mamba_git, work) if args.mamba_git else None
    rows = []
    for cfg in configs(args.configs):
        name = config_name(cfg)
        tag = name.replace(" ", "_").replace("/", "")
        row = dict(config=name, cfg=cfg, ours=model_ours(dict(cfg, deterministic=args.deterministic),
                                                         os.path.join(work, "ours_" + tag), tools))
        if src:
            with contextlib.redirect_stdout(io.StringIO()):
                row["mamba"] = model_mamba(cfg, os.path.join(work, "mamba_" + tag), tools, src, args.cuda_root)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{who} {kind} {v['lower_bound_us']:.0f}/{v['latency_aware_us']:.0f} us"
                                      for who in ("ours", "mamba") if who in row
                                      for kind, v in row[who].items()), flush=True)
    table = markdown(rows, bool(src))
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
