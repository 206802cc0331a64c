"""Everything a GPU session should measure, in one command (GPU time is rare: one device call).

    python benchmarks/gpu_session.py [--out benchmarks/results] [--mamba-src DIR] [--revision SHA]
        [--steps environment tests floors mamba_ssm benchmarks report] [--dry-run]

Steps, each recorded (status, seconds, output) even when one fails, so a session is never lost:
  environment  device, torch / triton / CUDA versions, git revision
  tests        the test suite on the device (`pytest tests -x`, or --pytest-args)
  floors       the copy bandwidth and the exp2 throughput the device reaches (ssm_kernels.bench.floors)
  mamba_ssm    mamba_ssm's CUDA selective scan: imported if it is installed, else built from a
               fetched copy of state-spaces/mamba in --mamba-src (a git-ignored folder, never
               committed; its Python package and csrc/selective_scan are enough)
  benchmarks   `pytest benchmarks/` with mamba_ssm side by side, into OUT/benchmarks.json
  report       every measured time beside the static model's prediction (benchmarks/static_model.json,
               written by benchmarks/static_table.py --configs widths): OUT/gpu_session.json,
               OUT/gpu_session.md (a table for docs) and OUT/gpu_session.png

--dry-run runs every step on the CPU at tiny sizes, with the Triton kernels under the interpreter
(mamba_ssm is only looked for, not built: that needs nvcc and a GPU), so that the script cannot
rot unnoticed; tests/test_gpu_session.py runs it.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = ("environment", "tests", "floors", "mamba_ssm", "benchmarks", "report")
STATIC_MODEL = os.path.join(HERE, "static_model.json")

# The benchmark grid: the defaults of benchmarks/conftest.py on CUDA; tiny on the CPU.
DRY_BENCH = ["--bench-widths", "4", "--bench-seqlen", "8", "--bench-batch", "1", "--bench-d-state", "2",
             "--bench-dtype", "fp32", "--bench-rounds", "1", "--bench-warmup", "0", "--bench-multipliers", "fused"]
DRY_TESTS = ["tests/test_hostile_inputs.py", "-k", "zero_state"]
# mamba_ssm's selective-scan extension: its binding and kernels, for one architecture.
MAMBA_NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"]


def run_command(cmd, env=None, timeout=None):
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout)
    return dict(command=" ".join(cmd), returncode=proc.returncode, seconds=time.time() - start,
                output_tail=(proc.stdout + proc.stderr)[-4000:])


class Session:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.results = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(), dry_run=args.dry_run,
                            steps={})
        self.extra_path = []  # PYTHONPATH entries that make mamba_ssm importable in subprocesses

    @property
    def device(self):
        import torch
        return torch.device("cuda" if torch.cuda.is_available() and not self.args.dry_run else "cpu")

    def step(self, name):
        start = time.time()
        try:
            record = dict(status="ok", **(getattr(self, name)() or {}))
        except Exception as exc:  # keep going: the other steps still measure something
            record = dict(status="error", error=repr(exc), traceback=traceback.format_exc()[-3000:])
        if record.get("returncode"):
            record["status"] = "failed"
        record["seconds"] = time.time() - start
        self.results["steps"][name] = record
        print(f"[gpu_session] {name}: {record['status']} ({record['seconds']:.1f} s)", flush=True)
        self.save()

    def save(self):
        with open(os.path.join(self.out, "gpu_session.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)

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
                    python=sys.version.split()[0], revision=revision,
                    triton_interpret=os.environ.get("TRITON_INTERPRET", ""))

    def tests(self):
        selection = DRY_TESTS if self.args.dry_run else self.args.pytest_args.split()
        return run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection])

    def floors(self):
        from ssm_kernels.bench import floors
        if self.args.dry_run:
            return dict(copy=floors.copy_bandwidth(self.device, nbytes=1 << 16, rounds=1),
                        exp2=floors.exp2_throughput(self.device, elements=1024, repeats=2, rounds=1))
        return dict(copy=floors.copy_bandwidth(self.device), exp2=floors.exp2_throughput(self.device))

    def mamba_ssm(self):
        probe = [sys.executable, "-c", "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn"]
        found = run_command(probe)
        if found["returncode"] == 0:
            return dict(source="installed")
        src = self.args.mamba_src
        if src is None:
            return dict(source=None, note="mamba_ssm is not importable and no --mamba-src was given: "
                        "the benchmarks run without it", probe=found["output_tail"][-500:])
        csrc = os.path.join(src, "csrc", "selective_scan")
        sources = [os.path.join(csrc, f) for f in sorted(os.listdir(csrc)) if f.endswith((".cpp", ".cu"))]
        build = os.path.join(HERE, ".mamba_build")  # git-ignored, like the sources
        plan = dict(source=os.path.abspath(src), sources=len(sources), build_directory=build)
        if self.args.dry_run or self.device.type != "cuda":
            return dict(plan, note="dry run: the build needs nvcc and a GPU; planned only")
        os.makedirs(build, exist_ok=True)
        import torch
        major, minor = torch.cuda.get_device_capability()
        script = ("import torch\nfrom torch.utils.cpp_extension import load\n"
                  f"load(name='selective_scan_cuda', sources={sources!r}, build_directory={build!r}, "
                  f"extra_cflags=['-O3', '-std=c++17'], extra_cuda_cflags={MAMBA_NVCC_FLAGS!r} + "
                  f"['-gencode', 'arch=compute_{major}{minor},code=sm_{major}{minor}'], "
                  f"extra_include_paths=[{csrc!r}], verbose=False)\n")
        built = run_command([sys.executable, "-c", script], env=dict(MAX_JOBS=str(os.cpu_count() or 4)),
                            timeout=self.args.mamba_build_timeout)
        self.extra_path = [build, os.path.abspath(src)]
        check = run_command(probe, env=self._env())
        return dict(plan, build=built, returncode=check["returncode"],
                    import_output=check["output_tail"][-1500:])

    def benchmarks(self):
        json_path = os.path.join(self.out, "benchmarks.json")
        options = DRY_BENCH if self.args.dry_run else shlex.split(self.args.bench_args)
        if self.args.dry_run:
            options = options + ["--bench-device", "cpu"]
        record = run_command([sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider",
                              f"--benchmark-json={json_path}", *options], env=self._env())
        return dict(record, json=json_path)

    def report(self):
        bench = os.path.join(self.out, "benchmarks.json")
        with open(bench) as f:
            benchmarks = json.load(f)["benchmarks"]
        with open(STATIC_MODEL) as f:
            model = json.load(f)
        rows = measured_beside_model(benchmarks, model)
        others = packing_and_decode(benchmarks)
        with open(os.path.join(self.out, "gpu_session.md"), "w") as f:
            f.write(markdown(rows, self.results["steps"].get("environment", {})) + "\n\n"
                    + others_markdown(others) + "\n")
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
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the results")
    parser.add_argument("--mamba-src", help="a fetched copy of state-spaces/mamba (git-ignored, never committed)")
    parser.add_argument("--mamba-build-timeout", type=int, default=600, help="seconds for building mamba_ssm")
    parser.add_argument("--revision", help="git revision to record (the device copy may have no .git)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--pytest-args", default="tests -x", help="what the tests step runs (default: the suite)")
    parser.add_argument("--bench-args", default="", help="extra options for `pytest benchmarks/`, e.g. "
                        "\"--bench-backends 'triton mamba_ssm'\" (see benchmarks/README.md)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    if args.dry_run:  # before triton is imported; subprocesses inherit it
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("SSM_BENCH_DEVICE", "cpu")
    sys.path.insert(0, ROOT)
    session = Session(args)
    for name in STEPS:
        if name in args.steps:
            session.step(name)
    failed = [n for n, r in session.results["steps"].items() if r["status"] != "ok"]
    print(f"[gpu_session] results in {session.out}" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
