"""The CUDA kernels of csrc/cuda/ run on the CPU: csrc/cuda/emulated.cpp compiled with g++ (each
thread of a block an OS thread, emulate.h), loaded with ctypes. EmulatedExtension stands in for
ssm_kernels._C's CUDA part: cuda_forward and cuda_backward take the binding's keyword arguments
(csrc/cuda/scan_cuda.cu) and run the same dispatch (launch.h), so that the "cuda" backend's Python
side (ops/selective_scan/cuda_ext.py) runs here unchanged. Only for the tests: nothing of it is
installed, and nothing here is fast."""

import ctypes
import functools
import os
import shutil
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "emulated.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
THREADS = 128  # kThreads of scan_kernels.cuh


def _pow2(x):
    return 1 if x <= 1 else 2 * _pow2((x + 1) // 2)


def bwd_slices(d_state):  # as scan_kernels.cuh's bwd_slices (the time-sequential backward)
    return max(4, _pow2((d_state + 3) // 4))


class Params(ctypes.Structure):
    """scan_kernels.cuh's Params, field for field."""
    _fields_ = ([(name, ctypes.c_int) for name in ("batch", "dim", "seqlen", "d_state", "groups", "n_slots",
                                                   "n_seqs")]
                + [("seqs", ctypes.c_void_p)]
                + [(name, ctypes.c_bool) for name in ("softplus", "B_fixed", "C_fixed")]
                + [(name, ctypes.c_float) for name in ("dt_scale", "b_scale", "c_scale")]
                + [(name, ctypes.c_void_p) for name in ("u", "delta", "z", "B", "C", "A", "D", "bias", "h0", "states",
                                                        "out", "last", "dout", "dlast", "du", "ddelta", "dz", "dA",
                                                        "dB", "dC", "dD", "dbias", "dh0")]
                + [("n_cblocks", ctypes.c_int)])


def unavailable_reason():
    """None when a C++ compiler is here, else why the emulated kernels cannot be built."""
    compiler = os.environ.get("CXX", "g++")
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler!r} is not on PATH)"


@functools.lru_cache(maxsize=None)
def library(build_dir: str):
    """csrc/cuda/emulated.cpp built once per build_dir, loaded."""
    path = os.path.join(build_dir, "ssmk_emulated.so")
    subprocess.run([os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                    "-I", os.path.dirname(SOURCE), SOURCE, "-o", path], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(path)
    assert lib.ssmk_params_size() == ctypes.sizeof(Params), "Params differs between C++ and ctypes"
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


def params(*, u, delta, A, B, C, seqs, states, groups, softplus, dt_scale, b_scale, c_scale, D=None, z=None,
           delta_bias=None, initial_state=None, out=None, last_state=None, dout=None, dlast_state=None, du=None,
           ddelta=None, dz=None, dA=None, dB=None, dC=None, dD=None, ddelta_bias=None, dinitial_state=None,
           n_cblocks=0):
    """Params from the binding's keyword arguments (scan_cuda.cu's names), tensors laid out as it
    checks; the caller keeps the tensors alive."""
    batch, dim, seqlen = u.shape
    return Params(batch=batch, dim=dim, seqlen=seqlen, d_state=A.shape[1], groups=groups, n_slots=states.shape[2],
                  n_seqs=seqs.shape[1], seqs=_ptr(seqs), softplus=softplus, B_fixed=B.dim() == 2, C_fixed=C.dim() == 2,
                  dt_scale=dt_scale, b_scale=b_scale, c_scale=c_scale, u=_ptr(u), delta=_ptr(delta), z=_ptr(z),
                  B=_ptr(B), C=_ptr(C), A=_ptr(A), D=_ptr(D), bias=_ptr(delta_bias), h0=_ptr(initial_state),
                  states=_ptr(states), out=_ptr(out), last=_ptr(last_state), dout=_ptr(dout), dlast=_ptr(dlast_state),
                  du=_ptr(du), ddelta=_ptr(ddelta), dz=_ptr(dz), dA=_ptr(dA), dB=_ptr(dB), dC=_ptr(dC), dD=_ptr(dD),
                  dbias=_ptr(ddelta_bias), dh0=_ptr(dinitial_state), n_cblocks=n_cblocks)


def _run(entry, p, dtype):
    code = entry(ctypes.byref(p), DTYPE_CODES[dtype])
    assert code == 0, f"the emulated kernels refused this configuration (code {code})"


class EmulatedExtension:
    """ssm_kernels._C's CUDA part on the CPU: the time-parallel kernels (scan_cuda.cu's entries)."""

    def __init__(self, lib):
        self.lib = lib

    def cuda_forward(self, *, stream, **kwargs):
        _run(self.lib.ssmk_emulated_forward_segmented, params(**kwargs), kwargs["u"].dtype)

    def cuda_backward(self, *, stream, **kwargs):
        from ssm_kernels.ops.selective_scan.cuda_ext import CHANNELS_PER_BLOCK
        blocks = -(-(kwargs["u"].shape[1] // kwargs["groups"]) // CHANNELS_PER_BLOCK)  # launch.h's rule
        _run(self.lib.ssmk_emulated_backward_segmented, params(**kwargs, n_cblocks=blocks), kwargs["u"].dtype)


class SequentialCall:
    """The time-sequential kernels (states every 8 steps) on the inputs of one call, laid out as the
    "cuda" backend lays them out: forward() -> (out, last_state, states); backward(dout,
    dlast_state) -> the nine gradients, the kernels' partials summed in a fixed order."""

    def __init__(self, lib, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, config):
        from ssm_kernels.ops.selective_scan import cuda_ext
        self.lib, self.dtype = lib, u.dtype
        self.x = cuda_ext._inputs(u, delta, A, B, C, D, z, delta_bias, config, chunk=8)
        self.x.update(initial_state=None if initial_state is None else initial_state.float().contiguous())
        self.buffers = cuda_ext.forward_buffers(self.x, chunk=8, packed=config.cu_seqlens is not None)

    def forward(self):
        _run(self.lib.ssmk_emulated_forward, params(**self.x, **self.buffers), self.dtype)
        return self.buffers["out"], self.buffers["last_state"], self.buffers["states"]

    def backward(self, dout, dlast_state=None):
        from ssm_kernels.ops.selective_scan import cuda_ext
        x = self.x
        blocks = -(-(x["u"].shape[1] // x["groups"]) // (THREADS // bwd_slices(x["A"].shape[1])))
        g = cuda_ext.gradient_buffers(x, blocks)
        dout = dout.to(self.dtype).contiguous()
        dlast = None if dlast_state is None else dlast_state.float().contiguous()
        _run(self.lib.ssmk_emulated_backward,
             params(**x, states=self.buffers["states"], dout=dout, dlast_state=dlast, n_cblocks=blocks, **g),
             self.dtype)
        return cuda_ext.summed_gradients(g)


class ParallelCall:
    """The time-parallel kernels through the "cuda" backend's own Python side (cuda_ext), with
    EmulatedExtension in the place of ssm_kernels._C: the same interface as SequentialCall."""

    def __init__(self, lib, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, initial_state=None, config):
        self.lib, self.config = lib, config
        self.inputs = (u, delta, A, B, C)
        self.optional = dict(D=D, z=z, delta_bias=delta_bias)
        self.initial_state = initial_state

    def _with_emulation(self, fn, *args, **kwargs):
        from ssm_kernels.ops.selective_scan import cuda_ext
        real, cuda_ext._ext = cuda_ext._ext, lambda: EmulatedExtension(self.lib)
        try:
            return fn(*args, **kwargs)
        finally:
            cuda_ext._ext = real

    def forward(self):
        from ssm_kernels.ops.selective_scan import cuda_ext
        self.out, self.last, self.states = self._with_emulation(
            cuda_ext.selective_scan_fwd_cuda, *self.inputs, **self.optional, initial_state=self.initial_state,
            config=self.config)
        return self.out, self.last, self.states

    def backward(self, dout, dlast_state=None):
        from ssm_kernels.ops.selective_scan import cuda_ext
        return self._with_emulation(cuda_ext.selective_scan_bwd_cuda, dout, dlast_state, *self.inputs, **self.optional,
                                    chunk_states=self.states, config=self.config)
