"""Everything a GPU session should measure, in one command that fits the time a session gets.

    python benchmarks/gpu_session.py [--budget 540] [--out benchmarks/results] [--mamba-src DIR]
        [--revision SHA] [--steps ...] [--dry-run]

GPU time comes in short slots (15 minutes with the machine's start), so the steps run in the
order of their value and the whole run keeps to --budget seconds (default 540, 9 minutes): a step
that would not fit in what is left is skipped, and every command gets at most what is left
(minus a reserve for the report). Each step's result is written to OUT/gpu_session.json as soon
as it ends, and each benchmark run to its own OUT/bench_*.json, so a run cut short still leaves
its numbers; the report uses whatever is there.

  environment  device, torch / triton / CUDA versions, git revision
  kernels      our Triton kernels (fused multipliers): forward, backward, forward + backward at the
               benchmark widths, one pytest-benchmark run per mode (OUT/bench_kernels_<mode>.json)
  tests        a CUDA correctness subset of the tests (--pytest-args)
  floors       the copy bandwidth and the exp2 throughput the device reaches (ssm_kernels.bench.floors)
  mamba_ssm    mamba_ssm's CUDA selective scan: imported if installed, else built from a fetched copy
               of state-spaces/mamba (--mamba-src, git-ignored, never committed) for the benchmark's
               dtype only, the device's architecture only, with every core; skipped if it cannot fit
  benchmarks   mamba_ssm's scan at the same widths, and our kernels unfused beside it
               (OUT/bench_mamba_ssm.json), then packing and decoding (OUT/bench_packing_and_decode.json)
  report       every measured time beside the static model's prediction (benchmarks/static_model.json,
               written by benchmarks/tools/static_table.py --configs widths): OUT/gpu_session.md (a table
               for docs) and OUT/gpu_session.png

--dry-run runs every step on the CPU at tiny sizes, with the Triton kernels under the interpreter
(mamba_ssm is only planned, not built: that needs nvcc and a GPU), so that the script cannot rot
unnoticed; tests/test_gpu_session.py runs it.
"""

import argparse
import datetime
import glob
import json
import os
import shlex
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = ("environment", "kernels", "tests", "floors", "mamba_ssm", "benchmarks", "report")
# Seconds a step needs at least to be worth starting on one H100 with 16 cores (a guess until a
# session measures them: each step's seconds are in gpu_session.json).
MIN_SECONDS = dict(environment=0, kernels=60, tests=60, floors=15, mamba_ssm=240, benchmarks=60, report=0)
REPORT_RESERVE = 20  # seconds kept for the report
STATIC_MODEL = os.path.join(HERE, "static_model.json")

# The benchmark grid: the defaults of benchmarks/conftest.py on CUDA; tiny on the CPU.
DRY_BENCH = ["--bench-widths", "4", "--bench-seqlen", "8", "--bench-batch", "1", "--bench-d-state", "2",
             "--bench-dtype", "fp32", "--bench-rounds", "1", "--bench-warmup", "0", "--bench-device", "cpu"]
DRY_TESTS = "tests/test_hostile_inputs.py -k zero_state"
# What the tests step runs on a GPU: the scan's correctness against the float64 reference, every
# backend the device has, stopping at the first failure.
GPU_TESTS = "tests/test_selective_scan.py tests/test_varlen.py tests/test_state_update.py -x"
# mamba_ssm's selective-scan extension: its binding and kernels, for one architecture.
MAMBA_NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"]
MAMBA_DTYPES = {"bf16": ("bf16", "c10::BFloat16"), "fp16": ("fp16", "c10::Half"), "fp32": ("fp32", "float")}


def run_command(cmd, env=None, timeout=None):
    """Runs cmd in the project root; a command past its timeout is stopped and recorded as such."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = "timeout"
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (exc.stdout, exc.stderr)) + f"\n[stopped after {timeout:.0f} s]"
    return dict(command=" ".join(cmd), returncode=returncode, seconds=time.time() - start, output_tail=output[-4000:])


def mamba_stub_source(dtype):
    """C++ that defines the mamba_ssm binding's other dtype entries (fwd for the other input types
    and complex weights, bwd likewise) as raising, so that only the benchmark dtype's kernels need
    compiling. Declarations only: no mamba_ssm header is needed."""
    _, built = MAMBA_DTYPES[dtype]
    inputs = [t for _, t in MAMBA_DTYPES.values()]
    lines = ["// Generated by benchmarks/gpu_session.py: mamba_ssm entries this session does not build.",
             "#include <stdexcept>",
             "namespace c10 { struct Half; struct BFloat16; template <typename T> struct complex; }",
             "struct SSMParamsBase; struct SSMParamsBwd; typedef struct CUstream_st *cudaStream_t;",
             "template <typename input_t, typename weight_t>",
             "void selective_scan_fwd_cuda(SSMParamsBase &, cudaStream_t);",
             "template <typename input_t, typename weight_t>",
             "void selective_scan_bwd_cuda(SSMParamsBwd &, cudaStream_t);"]
    for kind, params in (("fwd", "SSMParamsBase"), ("bwd", "SSMParamsBwd")):
        for input_t in inputs:
            for weight_t in ("float", "c10::complex<float>"):
                if input_t == built and (weight_t == "float" or kind == "fwd"):
                    continue  # compiled: the fwd file has both weights, the bwd "real" file float only
                lines.append(f"template <> void selective_scan_{kind}_cuda<{input_t}, {weight_t}>({params} &, "
                             f"cudaStream_t) {{ throw std::runtime_error(\"not built by gpu_session.py\"); }}")
    return "\n".join(lines) + "\n"


def mamba_sources(csrc, dtype):
    """The binding, the benchmark dtype's forward and real backward kernels (the rest is stubbed)."""
    tag, _ = MAMBA_DTYPES[dtype]
    return [os.path.join(csrc, f) for f in ("selective_scan.cpp", f"selective_scan_fwd_{tag}.cu",
                                            f"selective_scan_bwd_{tag}_real.cu")]


class Session:
    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        for old in glob.glob(os.path.join(self.out, "bench_*.json")):  # the report reads every bench_*.json
            os.remove(old)
        self.results = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(), dry_run=args.dry_run,
                            budget_s=args.budget, steps={})
        self.extra_path = []  # PYTHONPATH entries that make mamba_ssm importable in subprocesses

    @property
    def device(self):
        import torch
        return torch.device("cuda" if torch.cuda.is_available() and not self.args.dry_run else "cpu")

    def left(self, reserve=REPORT_RESERVE):
        """Seconds of the budget left for the current step's commands."""
        return self.args.budget - (time.time() - self.start) - reserve

    def step(self, name):
        start = time.time()
        if name != "report" and self.left() < MIN_SECONDS[name]:
            record = dict(status="skipped", note=f"{self.left():.0f} s left of the budget, the step needs "
                          f"about {MIN_SECONDS[name]} s")
        else:
            try:
                record = dict(status="ok", **(getattr(self, name)() or {}))
            except Exception as exc:  # keep going: the other steps still measure something
                record = dict(status="error", error=repr(exc), traceback=traceback.format_exc()[-3000:])
            if any(run.get("returncode") for run in [record] + record.get("runs", [])):
                record["status"] = "failed"
        record["seconds"] = time.time() - start
        self.results["steps"][name] = record
        print(f"[gpu_session] {name}: {record['status']} ({record['seconds']:.1f} s)", flush=True)
        self.save()

    def save(self):
        with open(os.path.join(self.out, "gpu_session.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)

    def bench(self, name, files, options):
        """One `pytest benchmarks/...` run into OUT/bench_<name>.json, within the budget left."""
        json_path = os.path.join(self.out, f"bench_{name}.json")
        options = (DRY_BENCH if self.args.dry_run else shlex.split(self.args.bench_args)) + options
        record = run_command([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
                              f"--benchmark-json={json_path}", *options], env=self._env(), timeout=self.left())
        return dict(record, json=json_path)

    # -- steps ------------------------------------------------------------------------------

    def environment(self):
        import torch
        import triton
        revision = self.args.revision
        if revision is None:
            git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
            revision = git.stdout.strip() if git.returncode == 0 else "unknown (pass --revision)"
        return dict(device=torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
                    torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                    python=sys.version.split()[0], revision=revision, cpus=os.cpu_count(),
                    triton_interpret=os.environ.get("TRITON_INTERPRET", ""))

    def kernels(self):
        runs = []
        for mode in ("fwd", "bwd", "fwdbwd"):  # one run per mode: a cut run keeps the modes before it
            if self.left() < MIN_SECONDS["kernels"] / 3:
                break
            runs.append(self.bench(f"kernels_{mode}", ["benchmarks/test_scan_throughput.py"],
                                   ["--bench-backends", "triton", "--bench-multipliers", "fused",
                                    "--bench-modes", mode]))
        return dict(runs=runs, modes=len(runs))

    def tests(self):
        selection = DRY_TESTS if self.args.dry_run else self.args.pytest_args
        return run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *shlex.split(selection)],
                           timeout=self.left())

    def floors(self):
        from ssm_kernels.bench import floors
        if self.args.dry_run:
            return dict(copy=floors.copy_bandwidth(self.device, nbytes=1 << 16, rounds=1),
                        exp2=floors.exp2_throughput(self.device, elements=1024, repeats=2, rounds=1))
        return dict(copy=floors.copy_bandwidth(self.device), exp2=floors.exp2_throughput(self.device))

    def mamba_importable(self):
        """Whether a subprocess (with the built extension's path, if any) imports mamba_ssm's scan."""
        probe = [sys.executable, "-c", "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn"]
        return run_command(probe, env=self._env(), timeout=60)

    def mamba_ssm(self):
        found = self.mamba_importable()
        if found["returncode"] == 0:
            return dict(source="installed")
        src = self.args.mamba_src
        if src is None:
            return dict(source=None, note="mamba_ssm is not importable and no --mamba-src was given: "
                        "the benchmarks run without it", probe=found["output_tail"][-500:])
        csrc = os.path.join(src, "csrc", "selective_scan")
        build = os.path.join(HERE, ".mamba_build")  # git-ignored, like the sources
        os.makedirs(build, exist_ok=True)
        stub = os.path.join(build, "not_built_entries.cpp")
        with open(stub, "w") as f:
            f.write(mamba_stub_source(self.args.bench_dtype))
        sources = mamba_sources(csrc, self.args.bench_dtype) + [stub]
        plan = dict(source=os.path.abspath(src), sources=[os.path.relpath(x, src) if x.startswith(src) else x
                                                          for x in sources], build_directory=build)
        if self.args.dry_run or self.device.type != "cuda":
            return dict(plan, note="dry run: the build needs nvcc and a GPU; planned only")
        import torch
        major, minor = torch.cuda.get_device_capability()
        script = ("import torch\nfrom torch.utils.cpp_extension import load\n"
                  f"load(name='selective_scan_cuda', sources={sources!r}, build_directory={build!r}, "
                  f"extra_cflags=['-O3', '-std=c++17'], extra_cuda_cflags={MAMBA_NVCC_FLAGS!r} + "
                  f"['-gencode', 'arch=compute_{major}{minor},code=sm_{major}{minor}'], "
                  f"extra_include_paths=[{csrc!r}], verbose=False)\n")
        built = run_command([sys.executable, "-c", script], env=dict(MAX_JOBS=str(os.cpu_count() or 4)),
                            timeout=min(self.args.mamba_build_timeout, self.left(MIN_SECONDS["benchmarks"])))
        self.extra_path = [build, os.path.abspath(src)]
        check = self.mamba_importable()
        return dict(plan, build=built, returncode=check["returncode"], import_output=check["output_tail"][-1500:])

    def benchmarks(self):
        runs = []
        if self.mamba_importable()["returncode"] == 0:  # installed, or built by the mamba_ssm step
            runs.append(self.bench("mamba_ssm", ["benchmarks/test_scan_throughput.py"],
                                   ["--bench-backends", "mamba_ssm triton", "--bench-multipliers", "none"]))
        if self.left() >= MIN_SECONDS["benchmarks"] / 2:
            runs.append(self.bench("packing_and_decode", ["benchmarks/test_packing_and_decode.py"],
                                   ["--bench-backends", "triton"]))
        return dict(runs=runs)

    def report(self):
        benchmarks = []
        for path in sorted(glob.glob(os.path.join(self.out, "bench_*.json"))):
            try:
                with open(path) as f:
                    benchmarks += json.load(f)["benchmarks"]
            except (OSError, ValueError, KeyError):  # a run stopped before pytest wrote its file
                continue
        with open(STATIC_MODEL) as f:
            model = json.load(f)
        rows = measured_beside_model(benchmarks, model)
        others = packing_and_decode(benchmarks)
        with open(os.path.join(self.out, "gpu_session.md"), "w") as f:
            f.write(markdown(rows, self.results["steps"].get("environment", {})) + "\n\n"
                    + others_markdown(others) + "\n")
        if rows:
            plot(rows, os.path.join(self.out, "gpu_session.png"))
        self.results["rows"], self.results["packing_and_decode"] = rows, others
        return dict(rows=len(rows), with_prediction=sum(r["model_lower_bound_ms"] is not None for r in rows),
                    packing_and_decode=len(others))

    def _env(self):
        if not self.extra_path:
            return None
        return dict(PYTHONPATH=os.pathsep.join(self.extra_path + [os.environ.get("PYTHONPATH", "")]))


# -- measured against modeled ---------------------------------------------------------------------

def _prediction(model, info, backend):
    """The static model's (lower bound, latency-aware) in ms for a benchmark row, or (None, None)."""
    who = {"triton": "ours", "mamba_ssm": "mamba"}.get(backend)
    for row in model:
        cfg = row["cfg"]
        same = (cfg["dim"], cfg["seqlen"], cfg["batch"], cfg["d_state"], cfg["dtype"]) == (
            info["d_inner"], info["seqlen"], info["batch"], info["d_state"], info["dtype"])
        if same and who in row and not cfg["fixed_bc"]:
            kinds = ["fwd", "bwd"] if info["mode"] == "fwdbwd" else [info["mode"]]
            return (sum(row[who][k]["lower_bound_us"] for k in kinds) / 1e3,
                    sum(row[who][k]["latency_aware_us"] for k in kinds) / 1e3)
    return None, None


def measured_beside_model(benchmarks, model):
    """The scan benchmarks (test_scan_throughput.py), each beside the model's prediction."""
    rows = []
    for b in benchmarks:
        info = b["extra_info"]
        if "mode" not in info:  # packing and decode: see packing_and_decode
            continue
        lower, latency = _prediction(model, info, info["backend"])
        measured = info["median_ms"]
        rows.append(dict(backend=info["backend"], multipliers=info["multipliers"], mode=info["mode"],
                         d_inner=info["d_inner"], seqlen=info["seqlen"], batch=info["batch"], d_state=info["d_state"],
                         dtype=info["dtype"], device=info["device"], measured_ms=measured, gbps=info["gbps"],
                         model_lower_bound_ms=lower, model_latency_aware_ms=latency,
                         measured_over_latency_aware=None if latency is None else measured / latency))
    return rows


def packing_and_decode(benchmarks):
    """The rows of test_packing_and_decode.py: packed / padded tokens per second and decode tokens/s."""
    rows = []
    for b in benchmarks:
        info = b["extra_info"]
        if "layout" in info or "tokens_per_s" in info:
            rows.append(dict(name=b["name"], backend=info["backend"], median_ms=info.get("median_ms"),
                             layout=info.get("layout"), d_inner=info.get("d_inner"), d_model=info.get("d_model"),
                             real_tokens_per_s=info.get("real_tokens_per_s"), tokens_per_s=info.get("tokens_per_s")))
    return rows


def others_markdown(rows):
    lines = ["| benchmark | median ms | real tokens/s (packing) | tokens/s (decode) |", "|---|---|---|---|"]
    for r in rows:
        def num(x):
            return "—" if x is None else f"{x:,.1f}"
        lines.append(f"| {r['name']} | {num(r['median_ms'])} | {num(r['real_tokens_per_s'])} | {num(r['tokens_per_s'])} |")
    return "\n".join(lines)


def markdown(rows, environment):
    def ms(x):
        return "—" if x is None else f"{x:.3f}"
    lines = [f"Measured on {environment.get('device', '?')} (torch {environment.get('torch', '?')}, triton "
             f"{environment.get('triton', '?')}, revision {environment.get('revision', '?')}); model: static "
             "SASS model of benchmarks/static_model.json.", "",
             "| backend | multipliers | mode | d_inner | measured ms | model lower bound ms | model latency-aware ms "
             "| measured / latency-aware |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["mode"], r["d_inner"], r["backend"], r["multipliers"])):
        ratio = "—" if r["measured_over_latency_aware"] is None else f"{r['measured_over_latency_aware']:.2f}"
        lines.append(f"| {r['backend']} | {r['multipliers']} | {r['mode']} | {r['d_inner']} | {ms(r['measured_ms'])} "
                     f"| {ms(r['model_lower_bound_ms'])} | {ms(r['model_latency_aware_ms'])} | {ratio} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series = {}
        for r in rows:
            if r["mode"] == mode:
                series.setdefault((r["backend"], r["multipliers"]), []).append(r)
        for (backend, multipliers), rs in sorted(series.items()):
            rs.sort(key=lambda r: r["d_inner"])
            line, = ax.plot([r["d_inner"] for r in rs], [r["measured_ms"] for r in rs], "o-",
                            label=f"{backend} ({multipliers}) measured")
            modeled = [r for r in rs if r["model_latency_aware_ms"] is not None]
            if modeled and multipliers in ("fused", "none") and (backend == "mamba_ssm") == (multipliers == "none"):
                ax.plot([r["d_inner"] for r in modeled], [r["model_latency_aware_ms"] for r in modeled], "--",
                        color=line.get_color(), label=f"{backend} static model (latency-aware)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d_inner")
        ax.set_ylabel("ms")
        ax.set_title(mode)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=540, help="seconds the whole run may take (default 540)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the results")
    parser.add_argument("--mamba-src", help="a fetched copy of state-spaces/mamba (git-ignored, never committed)")
    parser.add_argument("--mamba-build-timeout", type=int, default=420, help="seconds for building mamba_ssm at most")
    parser.add_argument("--revision", help="git revision to record (the device copy may have no .git)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--pytest-args", default=GPU_TESTS, help=f"what the tests step runs (default: {GPU_TESTS})")
    parser.add_argument("--bench-args", default="", help="extra options for every `pytest benchmarks/` run, e.g. "
                        "\"--bench-widths '768 3072'\" (see benchmarks/README.md)")
    parser.add_argument("--bench-dtype", choices=sorted(MAMBA_DTYPES), default="bf16",
                        help="the benchmarks' dtype, the only one mamba_ssm is built for (default bf16)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    if args.budget <= REPORT_RESERVE:
        parser.error(f"--budget must exceed the {REPORT_RESERVE} s kept for the report")
    if args.dry_run:  # before triton is imported; subprocesses inherit it
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("SSM_BENCH_DEVICE", "cpu")
    elif "--bench-dtype" not in args.bench_args:  # mamba_ssm is built for this dtype only
        args.bench_args = f"--bench-dtype {args.bench_dtype} {args.bench_args}"
    sys.path.insert(0, ROOT)
    session = Session(args)
    for name in STEPS:
        if name in args.steps:
            session.step(name)
    failed = [n for n, r in session.results["steps"].items() if r["status"] in ("failed", "error")]
    skipped = [n for n, r in session.results["steps"].items() if r["status"] == "skipped"]
    print(f"[gpu_session] results in {session.out} after {time.time() - session.start:.0f} s"
          + (f"; not ok: {', '.join(failed)}" if failed else "")
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
