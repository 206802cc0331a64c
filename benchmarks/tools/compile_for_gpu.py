"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, exactly as the JIT
would compile them for a call of `selective_scan_fn` at a given configuration.

The forward and backward launchers run on "meta" tensors (shapes, dtypes and strides, no data)
with `JITFunction.run` replaced by a hook that binds the arguments the way the JIT does, with
its runtime specialization (integers equal to 1 become constants; integers and pointers
divisible by 16 are marked so), compiles for the target and launches nothing.

    python benchmarks/tools/compile_for_gpu.py --out DIR [--batch 4 --dim 2048 --seqlen 2048 --d-state 16
        --dtype bf16] [--fixed-bc] [--deterministic] [--packed | --state-update | --cuda] [--arch 90]

--packed: the same tokens as `batch` sequences of `seqlen` packed into one row (cu_seqlens);
--state-update: the decoding kernel (selective_state_update) for a batch of one step each;
--cuda: the compiled extension's CUDA kernels (csrc/cuda/) instead, compiled with nvcc.

writes, for every kernel the forward and backward launch, DIR/<name>.cubin and DIR/<name>.json
(kernel, kind, ctas, num_warps, shared_bytes, res_usage, loop_trips, es_total, hbm_bytes,
l2_bytes), which a static GPU model (not part of this repository) reads, and prints
each kernel's registers and spills.
"""

import argparse
import json
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"  # real compilation, before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default: a*b+c becomes one FMA

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ssm_kernels.ops.selective_scan import chunk  # noqa: E402
from ssm_kernels.ops.selective_scan.checks import check_inputs  # noqa: E402
from ssm_kernels.ops.selective_scan.config import ScanConfig  # noqa: E402
from ssm_kernels.testing import MULTIPLIERS  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class CompileOnly:
    """Context manager: while active, launching a Triton kernel compiles it for `arch` and
    records it instead of running it."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.compiled = []

    def __enter__(self):
        self._run = triton_jit.JITFunction.run
        target, backend, compiled = self.target, self.backend, self.compiled

        def run(fn, *args, grid, warmup, **kwargs):
            kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
            kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
            if hasattr(triton.knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.7
                kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
            bind = triton_jit.create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = bind(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            grid = grid(bound) if callable(grid) else grid
            compiled.append(dict(fn=fn, kernel=kernel, grid=tuple(grid) + (1,) * (3 - len(grid)),
                                 num_warps=options.num_warps, bound=dict(bound)))
            return None

        triton_jit.JITFunction.run = run
        return self

    def __exit__(self, *exc):
        triton_jit.JITFunction.run = self._run


def make_inputs(batch, dim, seqlen, d_state, dtype, fixed_bc, optional=True, groups=1, packed=False):
    """A Mamba-like call on the meta device: variable (batch, G, N, L) or fixed B/C; D, z,
    delta_bias and an initial state when `optional`; delta as the d-major view mamba_inner_fn
    passes. packed: the batch's sequences one after another in a row of batch * seqlen steps,
    with cu_seqlens (batch + 1,) and one initial state per sequence."""
    meta = dict(device="meta")
    sequences = batch
    if packed:
        batch, seqlen = 1, batch * seqlen

    def state_matrix():
        return (torch.empty(dim, d_state, **meta) if fixed_bc
                else torch.empty(batch, groups, d_state, seqlen, dtype=dtype, **meta))
    x = dict(u=torch.empty(batch, dim, seqlen, dtype=dtype, **meta),
             delta=torch.empty(dim, batch, seqlen, dtype=dtype, **meta).transpose(0, 1),
             A=torch.empty(dim, d_state, **meta), B=state_matrix(), C=state_matrix(),
             z=None, D=None, delta_bias=None, initial_state=None,
             cu_seqlens=torch.empty(sequences + 1, dtype=torch.int32, **meta) if packed else None)
    if optional:
        x.update(z=torch.empty(batch, dim, seqlen, dtype=dtype, **meta), D=torch.empty(dim, **meta),
                 delta_bias=torch.empty(dim, **meta), initial_state=torch.empty(sequences, dim, d_state, **meta))
    return x


# Every kernel variant the launchers can pick, in a few calls: io dtypes, fixed / variable /
# grouped B and C, optional inputs on and off, N from 1 to 256, chunks that are whole or partial,
# sequences shorter than one chunk and longer than many.
SHIPPED = [
    dict(batch=4, dim=2048, seqlen=2048, d_state=16, dtype="bf16"),
    dict(batch=2, dim=64, seqlen=37, d_state=16, dtype="fp32", fixed_bc=True, optional=False),
    dict(batch=2, dim=64, seqlen=300, d_state=1, dtype="fp16", groups=2),
    dict(batch=2, dim=64, seqlen=512, d_state=64, dtype="bf16", fixed_bc=True),
    dict(batch=1, dim=64, seqlen=8192, d_state=256, dtype="bf16", optional=False),
    dict(batch=2, dim=64, seqlen=1000, d_state=48, dtype="fp32"),
    dict(batch=3, dim=64, seqlen=700, d_state=16, dtype="bf16", packed=True),
]
# The decoding kernel: N from 16 to 256.
SHIPPED_STATE_UPDATE = [dict(batch=8, dim=256, d_state=16, dtype="bf16"),
                        dict(batch=2, dim=64, d_state=256, dtype="fp32")]


REDUCE_ROLES = {0: "", 1: "_bound", 2: "_fixed"}  # the backward's REDUCE constexpr -> name suffix


def traffic(role, batch, dim, seqlen, d_state, itemsize, fixed_bc, n_saved):
    """(HBM bytes, L2->SM bytes) a launch must move: every (batch, dim, L) tensor once, B and C
    once from HBM but once per channel from L2, the fp32 saved states; in the backward the dB and
    dC reductions (one per element-state each: 4-byte fp32 atomics; in deterministic mode an int32
    max in pass 1, then an int64 add plus a re-read of the bound in pass 2), and the conversion
    of the deterministic sums to fp32."""
    X = batch * dim * seqlen
    S = 0 if fixed_bc else batch * d_state * seqlen
    if role == "state_update":  # read state, x, dt, z, B, C; write state, out
        state = batch * dim * d_state * 4
        return 2 * state + 4 * X * itemsize + 2 * S * itemsize, 2 * state + 4 * X * itemsize + 2 * S * itemsize * dim
    states = batch * dim * n_saved * d_state * 4
    per_channel_bc = 0 if fixed_bc else 2 * d_state * seqlen * itemsize * batch * dim
    reductions = 0 if fixed_bc else 2 * X * d_state
    if role == "fwd":  # read u, delta, z, B, C; write out, states
        return 4 * X * itemsize + 2 * S * itemsize + states, per_channel_bc + 4 * X * itemsize + states
    if role == "fixed_point":  # one of dB, dC: the scales from the bounds, or the sums to fp32
        return S * 16, S * 16
    if role == "bwd_bound":  # read dout, u, delta, z, B, C, states; max into the int32 bounds
        return (4 * X * itemsize + 2 * S * itemsize + 2 * S * 4 + states,
                per_channel_bc + reductions * 4 + 4 * X * itemsize + states)
    # read dout, u, delta, z, B, C, states; write du, ddelta, dz, dB, dC
    per_reduction, sums = (12, 2 * S * 12) if role == "bwd_fixed" else (4, 2 * S * 4)
    return (7 * X * itemsize + 2 * S * itemsize + sums + states,
            per_channel_bc + reductions * per_reduction + 7 * X * itemsize + states)


def compile_config(out_dir, *, batch=4, dim=2048, seqlen=2048, d_state=16, dtype="bf16", fixed_bc=False,
                   optional=True, groups=1, deterministic=False, packed=False, arch=90):
    """Compile every kernel of one forward + backward call; write DIR/<name>.{cubin,json}.
    Returns the JSON records."""
    x = make_inputs(batch, dim, seqlen, d_state, DTYPES[dtype], fixed_bc, optional, groups, packed)
    B, C, groups = check_inputs(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                x["initial_state"], state_rows=batch if packed else None)
    config = ScanConfig(groups=groups, delta_softplus=optional, backend="triton", deterministic=deterministic,
                        cu_seqlens=x["cu_seqlens"], **MULTIPLIERS)
    optional_inputs = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"])
    with CompileOnly(arch) as launches:
        out, last, states = chunk.selective_scan_fwd_triton(x["u"], x["delta"], x["A"], B, C, **optional_inputs,
                                                            initial_state=x["initial_state"], config=config)
        chunk.selective_scan_bwd_triton(torch.empty_like(out), torch.empty_like(last) if optional else None,
                                        x["u"], x["delta"], x["A"], B, C, **optional_inputs, chunk_states=states,
                                        config=config)
    return _write(out_dir, launches.compiled, dict(
        arch=arch, dtype=dtype, batch=batch, dim=dim, seqlen=seqlen, d_state=d_state, fixed_bc=fixed_bc,
        deterministic=deterministic, packed=packed), states.shape[2] // batch if packed else states.shape[2])


def compile_state_update(out_dir, *, batch=64, dim=4096, d_state=16, dtype="bf16", arch=90):
    """Compile the decoding kernel for one step of a (batch, dim) batch with an fp32 state."""
    from ssm_kernels.ops.state_update import kernel as state_update
    meta = dict(device="meta")
    io = dict(dtype=DTYPES[dtype], **meta)
    x = torch.empty(batch, dim, **io)
    BC = torch.empty(batch, 1, d_state, **io)
    with CompileOnly(arch) as launches:
        state_update.state_update_triton(
            torch.empty(batch, dim, d_state, **meta), x, torch.empty_like(x), torch.empty(dim, d_state, **meta),
            BC, torch.empty_like(BC), D=torch.empty(dim, **meta), z=torch.empty_like(x), dt_bias=torch.empty(dim, **meta),
            out=torch.empty_like(x), config=ScanConfig(groups=1, delta_softplus=True, backend="triton", **MULTIPLIERS))
    return _write(out_dir, launches.compiled, dict(arch=arch, dtype=dtype, batch=batch, dim=dim, seqlen=1,
                                                   d_state=d_state, fixed_bc=False, deterministic=False,
                                                   packed=False), 0)


def _write(out_dir, compiled, cfg, n_saved):
    """DIR/<kernel>.{cubin,json} for each compiled launch; returns the records."""
    batch, dim, seqlen, d_state, dtype = (cfg[k] for k in ("batch", "dim", "seqlen", "d_state", "dtype"))
    itemsize = DTYPES[dtype].itemsize
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for launch in compiled:
        bound = {k: getattr(v, "value", v) for k, v in launch["bound"].items()}  # constexprs unwrapped
        suffix = REDUCE_ROLES.get(bound.get("REDUCE"), "")
        name = launch["fn"].__name__ + suffix
        kind = "fwd" if "fwd" in name or "state_update" in name else "bwd"
        role = ("fixed_point" if name.startswith("fixed_point") else "state_update" if "state_update" in name
                else kind + suffix)
        if any(r["kernel"] == name for r in records):  # a kernel launched twice (dB and dC)
            name += f"_{sum(r['kernel'].startswith(name) for r in records)}"
        stem = os.path.join(out_dir, name)
        with open(stem + ".cubin", "wb") as f:
            f.write(launch["kernel"].asm["cubin"])
        res_usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", stem + ".cubin"],
                                   capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1].strip()
        hbm, l2 = traffic(role, batch, dim, seqlen, d_state, itemsize, cfg["fixed_bc"], n_saved)
        loop_trips = [triton.cdiv(seqlen, bound["LANES"] * bound["ITEMS"]), d_state] if "LANES" in bound else 1
        grid = launch["grid"]
        record = dict(kernel=name, kind=kind, **cfg, grid=grid,
                      ctas=grid[0] * grid[1] * grid[2], num_warps=launch["num_warps"],
                      shared_bytes=launch["kernel"].metadata.shared, res_usage=res_usage, loop_trips=loop_trips,
                      es_total=bound["numel"] if "numel" in bound else batch * dim * seqlen * d_state,
                      hbm_bytes=hbm, l2_bytes=l2,
                      constexprs={k: v for k, v in bound.items() if k.isupper()})
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=1)
        records.append(record)
    return records


CUDA_TYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
CUDA_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc", "cuda", "scan_kernels_sm90.cu")


def cuda_layout(dim, groups, d_state):
    """Threads per channel and channel blocks per group of the csrc/ CUDA kernels (the rule of
    fwd_slices / bwd_slices / channel_blocks in csrc/cuda/scan_kernels.cuh)."""
    def pow2(x):
        return 1 << max(0, (x - 1).bit_length())
    fwd, bwd = pow2(-(-d_state // 8)), max(4, pow2(-(-d_state // 4)))
    dpg = dim // groups
    layout = {kind: (s, -(-dpg // (128 // s))) for kind, s in (("fwd", fwd), ("bwd", bwd))}
    # the time-parallel backward: 4 states a lane, at least 2 slices; 4 warps x 8 channels a block
    layout["bwd_segmented"] = (max(2, pow2(-(-d_state // 4))), -(-dpg // 32))
    return layout


def compile_cuda(out_dir, *, batch, dim, seqlen, d_state, dtype, arch, nvcc):
    """The csrc/ CUDA kernels (forward, backward) for sm_<arch> with nvcc, one cubin each, and the
    JSON the static model reads. The traffic counts what each kernel must move: its inputs and
    outputs once, the states saved every 8 steps, the backward's per-block dB/dC partials."""
    os.makedirs(out_dir, exist_ok=True)
    itemsize = DTYPES[dtype].itemsize
    act = batch * dim * seqlen * itemsize
    bc = 2 * batch * d_state * seqlen * itemsize
    states = batch * dim * -(-seqlen // 8) * d_state * 4
    layout = cuda_layout(dim, 1, d_state)
    records = []
    for kind in ("fwd", "bwd", "fwd_segmented", "bwd_segmented"):
        slices, blocks = layout[kind if kind in ("bwd", "bwd_segmented") else "fwd"]
        name = f"cuda_scan_{kind}"
        stem = os.path.join(out_dir, name)
        subprocess.run([nvcc, f"-arch=sm_{arch}", "-cubin", "-O3", "-lineinfo", f"-DSSMK_BACKWARD={int(kind == 'bwd')}",
                        f"-DSSMK_SEGMENTED={int(kind == 'fwd_segmented')}",
                        f"-DSSMK_BACKWARD_SEGMENTED={int(kind == 'bwd_segmented')}", f"-DSSMK_T={CUDA_TYPES[dtype]}",
                        f"-DSSMK_N={d_state}", "-o", stem + ".cubin", CUDA_SOURCE], check=True)
        res_usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", stem + ".cubin"],
                                   capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1].strip()
        smem = int(re.search(r"SHARED:(\d+)", res_usage).group(1)) if "SHARED:" in res_usage else 0
        ctas, trips = batch * blocks, -(-seqlen // 8)
        if kind == "fwd_segmented":  # a warp per channel, passes of 8 * 32 / slices steps, states every 128
            # two sibling loops: the general path (the last pass; the larger loop, listed first) and the
            # whole passes, which run all the others
            ctas, whole = -(-batch * dim // 4), seqlen // (8 * 32 // slices)
            trips = [1, whole]
            hbm = 4 * act + bc + states // 16
        elif kind == "bwd_segmented":  # blocks of 32 channels; per pass of 8 * 32 / slices steps, 8 channels a warp
            # the loops, outer first: chunks of 128 steps, passes of a chunk, channels of a warp (the
            # chunk's earlier passes, rerun forward inside the last, are counted once per channel)
            ctas = batch * blocks
            trips = [-(-seqlen // 128), 128 // (8 * 32 // slices), 8]
            hbm = 7 * act + bc + states // 16 + 2 * blocks * batch * d_state * seqlen * 4
        elif kind == "fwd":  # u, delta, z, B, C in; out, states out
            hbm = 4 * act + bc + states
        else:  # u, delta, z, dout, B, C, states in; du, ddelta, dz, dB/dC partials out
            hbm = 7 * act + bc + states + 2 * blocks * batch * d_state * seqlen * 4
        record = dict(kernel=name, kind=kind.split("_")[0], arch=arch, dtype=dtype, batch=batch, dim=dim, seqlen=seqlen,
                      d_state=d_state, ctas=ctas, num_warps=4, shared_bytes=smem, res_usage=res_usage,
                      loop_trips=trips, es_total=batch * dim * seqlen * d_state, hbm_bytes=hbm,
                      threads_per_channel=slices)
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=1)
        records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for <kernel>.cubin and <kernel>.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--fixed-bc", action="store_true", help="fixed (dim, N) B and C instead of variable")
    parser.add_argument("--deterministic", action="store_true", help="the backward's deterministic mode")
    parser.add_argument("--packed", action="store_true", help="the batch's sequences packed in one row (cu_seqlens)")
    parser.add_argument("--state-update", action="store_true", help="the decoding kernel (selective_state_update)")
    parser.add_argument("--cuda", action="store_true",
                        help="the compiled extension's CUDA kernels (csrc/cuda) instead of the Triton ones, with nvcc")
    parser.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"),
                        help="nvcc for --cuda (default $NVCC, else nvcc on PATH)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--shipped", action="store_true",
                        help="instead of one configuration, every variant the launchers pick (DIR/<n>/...)")
    args = parser.parse_args(argv)
    if args.shipped:
        calls = [(os.path.join(args.out, str(i)), dict(cfg, deterministic=det))
                 for i, cfg in enumerate(SHIPPED) for det in (False, True)]
        calls = [(path + ("-deterministic" if cfg["deterministic"] else ""), cfg) for path, cfg in calls]
        for i, cfg in enumerate(SHIPPED_STATE_UPDATE):
            for r in compile_state_update(os.path.join(args.out, f"state_update-{i}"), arch=args.arch, **cfg):
                print(f"{r['kernel']} ({', '.join(f'{k}={v}' for k, v in cfg.items())}): grid {r['grid']}, "
                      f"{r['num_warps']} warps, {r['res_usage']}", flush=True)
    elif args.cuda:
        for r in compile_cuda(args.out, batch=args.batch, dim=args.dim, seqlen=args.seqlen, d_state=args.d_state,
                              dtype=args.dtype, arch=args.arch, nvcc=args.nvcc):
            print(f"{r['kernel']}: {r['ctas']} CTAs, {r['num_warps']} warps, {r['res_usage']}", flush=True)
        return 0
    elif args.state_update:
        for r in compile_state_update(args.out, batch=args.batch, dim=args.dim, d_state=args.d_state,
                                      dtype=args.dtype, arch=args.arch):
            print(f"{r['kernel']}: grid {r['grid']}, {r['num_warps']} warps, {r['res_usage']}", flush=True)
        return 0
    else:
        calls = [(args.out, dict(batch=args.batch, dim=args.dim, seqlen=args.seqlen, d_state=args.d_state,
                                 dtype=args.dtype, fixed_bc=args.fixed_bc, deterministic=args.deterministic,
                                 packed=args.packed))]
    for path, cfg in calls:
        for r in compile_config(path, arch=args.arch, **cfg):
            print(f"{r['kernel']} ({', '.join(f'{k}={v}' for k, v in cfg.items())}): grid {r['grid']}, "
                  f"{r['num_warps']} warps, {r['res_usage']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
