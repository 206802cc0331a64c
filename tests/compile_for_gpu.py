"""Compile the Triton kernels for an NVIDIA GPU without one: Triton's ahead-of-time path
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin through the ptxas that ships with triton).

This catches code-generation errors that the interpreter cannot (it runs the kernels as numpy).
Each configuration uses the launchers' own CUDA block sizes and warps. Run by hand to also see
ptxas' register and spill report:

    python tests/compile_for_gpu.py [--arch 90] [--ptxas-report]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # real kernels, before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ssm_kernels.ops.selective_scan import chunk  # noqa: E402

# Pointer arguments that carry the input/output dtype; every other pointer is fp32.
IO_POINTERS = {"u_ptr", "delta_ptr", "z_ptr", "out_ptr", "B_ptr", "C_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
               "dz_ptr"}
SCALARS = {"dt_scale", "b_scale", "c_scale"}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# (d_state, io dtype, B/C variable, every optional input present)
CONFIGS = [(16, torch.bfloat16, True, True), (16, torch.float32, False, False), (1, torch.float16, True, False),
           (64, torch.bfloat16, False, True), (256, torch.bfloat16, True, True)]


def signature(kernel, constexprs, io_dtype):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (TRITON_TYPES[io_dtype] if name in IO_POINTERS else "fp32")
        elif name in SCALARS:
            sig[name] = "fp32"
        else:  # strides are int64 (large tensors), sizes int32
            sig[name] = "i64" if name.startswith("s_") else "i32"
    return sig


def compile_kernel(kernel, constexprs, io_dtype, arch, num_warps):
    src = ASTSource(fn=kernel, signature=signature(kernel, constexprs, io_dtype), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def ptxas_report(compiled, arch):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    regs, spills = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spill stores"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--ptxas-report", action="store_true")
    args = parser.parse_args(argv)
    cuda = torch.device("cuda")
    for d_state, io_dtype, variable, optional in CONFIGS:
        block_d, block_n, bt, blocks_per_group = chunk._blocks(d_state, 1536, cuda)
        common = dict(HAS_D=optional, HAS_Z=optional, HAS_BIAS=optional, SOFTPLUS=optional,
                      B_VARIABLE=variable, C_VARIABLE=variable, BLOCK_D=block_d, BLOCK_N=block_n, BT=bt)
        kernels = [("fwd", chunk.selective_scan_fwd_kernel, dict(common, HAS_H0=optional)),
                   ("bwd", chunk.selective_scan_bwd_kernel,
                    dict(common, HAS_DLAST=optional, USE_ATOMIC=variable and blocks_per_group > 1))]
        for name, kernel, constexprs in kernels:
            compiled = compile_kernel(kernel, constexprs, io_dtype, args.arch, chunk._num_warps(cuda))
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
            line = (f"sm_{args.arch} {name} N={d_state} {TRITON_TYPES[io_dtype]} variable_BC={variable} "
                    f"optional_inputs={optional} tile=({block_d},{block_n},{bt}): compiled")
            print(line + (f"; {ptxas_report(compiled, args.arch)}" if args.ptxas_report else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
