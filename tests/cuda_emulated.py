"""The CUDA kernels of csrc/cuda/ run on the CPU: csrc/cuda/emulated.cpp compiled with g++ (each
thread of a block an OS thread, emulate.h), loaded with ctypes, fed torch tensors the way a CUDA
launcher would lay them out, and its partial sums reduced in a fixed order, as the extension's
Python side would. Only for the tests: nothing here is fast, and nothing of it is installed."""

import ctypes
import functools
import os
import shutil
import subprocess

import torch

from ssm_kernels.ops.selective_scan.compiled import _sequence_table
from ssm_kernels.ops.utils import new_buffer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "emulated.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
THREADS = 128  # kThreads of scan_kernels.cuh
SEQUENTIAL_CHUNK, SEGMENTED_CHUNK = 8, 128  # steps between the saved states (kChunk, kSegmentedChunk)
BWD_CHANNELS_PER_WARP = 8  # emulated.cpp's kBwdChannelsPerWarp: the time-parallel backward's blocks


def _pow2(x):
    return 1 if x <= 1 else 2 * _pow2((x + 1) // 2)


def bwd_slices(d_state):  # as scan_kernels.cuh's bwd_slices
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
    """None when g++ with C++20 is here, else why the emulated kernels cannot be built."""
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


class Call:
    """One forward + backward of the emulated kernels on CPU tensors: u, delta, z (batch, dim, L)
    and variable B, C (batch, G, N, L) in one dtype (float32, float16 or bfloat16), fixed B, C
    (dim, N) and A, D, delta_bias, initial_state in float32."""

    def __init__(self, lib, u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, *,
                 delta_softplus=False, dt_scale=1.0, b_scale=1.0, c_scale=1.0, cu_seqlens=None, segmented=False):
        self.lib, self.segmented = lib, segmented
        batch, dim, seqlen = u.shape
        N = A.shape[1]
        groups = B.shape[1] if B.dim() == 4 else C.shape[1] if C.dim() == 4 else 1
        chunk = SEGMENTED_CHUNK if segmented else SEQUENTIAL_CHUNK
        self.seqs = _sequence_table(batch, seqlen, cu_seqlens, chunk)
        n_seqs = self.seqs.shape[1]
        n_slots = -(-seqlen // chunk) + (0 if cu_seqlens is None else n_seqs)
        self.tensors = dict(u=u.contiguous(), delta=delta.contiguous(), z=None if z is None else z.contiguous(),
                            B=B.contiguous(), C=C.contiguous(), A=A.float().contiguous(),
                            D=None if D is None else D.float().contiguous(),
                            bias=None if delta_bias is None else delta_bias.float().contiguous(),
                            h0=None if initial_state is None else initial_state.float().contiguous())
        self.dtype = u.dtype
        f32 = dict(dtype=torch.float32, device=u.device)
        # packed: the slots between sequences are never written; zeros, as the other backends
        self.states = torch.zeros(batch, dim, n_slots, N, **f32)
        self.out = new_buffer(batch, dim, seqlen, dtype=u.dtype, device=u.device)
        self.last = new_buffer(n_seqs, dim, N, **f32)
        self.p = Params(batch=batch, dim=dim, seqlen=seqlen, d_state=N, groups=groups, n_slots=n_slots, n_seqs=n_seqs,
                        seqs=_ptr(self.seqs), softplus=bool(delta_softplus), B_fixed=B.dim() == 2,
                        C_fixed=C.dim() == 2, dt_scale=dt_scale, b_scale=b_scale, c_scale=c_scale,
                        states=_ptr(self.states), out=_ptr(self.out), last=_ptr(self.last),
                        **{name: _ptr(t) for name, t in self.tensors.items()})

    def forward(self):
        """(out, last_state, chunk_states)."""
        run = self.lib.ssmk_emulated_forward_segmented if self.segmented else self.lib.ssmk_emulated_forward
        code = run(ctypes.byref(self.p), DTYPE_CODES[self.dtype])
        assert code == 0, f"the emulated forward refused this configuration (code {code})"
        return self.out, self.last, self.states

    def backward(self, dout, dlast_state=None):
        """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) from the forward's saved
        states: the time-sequential backward after the sequential forward, the time-parallel one
        after the segmented forward; the kernels' partials summed in a fixed order."""
        t, p = self.tensors, self.p
        batch, dim, seqlen, N, groups, n_seqs = p.batch, p.dim, p.seqlen, p.d_state, p.groups, p.n_seqs
        channels = THREADS // 32 * BWD_CHANNELS_PER_WARP if self.segmented else THREADS // bwd_slices(N)
        n_cblocks = -(-(dim // groups) // channels)
        f32 = dict(dtype=torch.float32, device=t["u"].device)

        def state_grad(fixed):
            return new_buffer(n_seqs, dim, N, **f32) if fixed else new_buffer(n_cblocks, batch, groups, N, seqlen,
                                                                              **f32)
        g = dict(du=new_buffer(batch, dim, seqlen, dtype=self.dtype, device=t["u"].device),
                 ddelta=new_buffer(batch, dim, seqlen, dtype=self.dtype, device=t["u"].device),
                 dz=None if t["z"] is None else new_buffer(batch, dim, seqlen, dtype=self.dtype, device=t["u"].device),
                 dA=new_buffer(n_seqs, dim, N, **f32), dB=state_grad(p.B_fixed), dC=state_grad(p.C_fixed),
                 dD=None if t["D"] is None else new_buffer(n_seqs, dim, **f32),
                 dbias=None if t["bias"] is None else new_buffer(n_seqs, dim, **f32),
                 dh0=new_buffer(n_seqs, dim, N, **f32))
        dout = dout.to(self.dtype).contiguous()
        dlast = None if dlast_state is None else dlast_state.float().contiguous()
        for name, buf in g.items():
            setattr(p, name, _ptr(buf))
        p.dout, p.dlast, p.n_cblocks = _ptr(dout), _ptr(dlast), n_cblocks
        run = self.lib.ssmk_emulated_backward_segmented if self.segmented else self.lib.ssmk_emulated_backward
        code = run(ctypes.byref(p), DTYPE_CODES[self.dtype])
        assert code == 0, f"the emulated backward refused this configuration (code {code})"
        # the partials (fixed dB/dC, dA, dD, dbias per sequence; variable dB/dC per channel block), in order
        return (g["du"], g["ddelta"], g["dA"].sum(0), g["dB"].sum(0), g["dC"].sum(0),
                None if g["dD"] is None else g["dD"].sum(0), g["dz"],
                None if g["dbias"] is None else g["dbias"].sum(0), g["dh0"])
