"""Bad input raises a ValueError or TypeError that names the argument, on every backend."""

import math

import pytest
import torch

from scan_cases import ALL_BACKENDS, DEVICE, as_leaves, make_inputs
from ssm_kernels import selective_scan_fn, selective_scan_ref

BACKENDS = ALL_BACKENDS


def good_args():
    leaves = {n: t.detach() for n, t in as_leaves(make_inputs(dim=4, groups=2), torch.float32).items()}
    return leaves


def call(backend, args, fn=selective_scan_fn, **kwargs):
    args = dict(args)
    initial_state = args.pop("initial_state", None)
    return fn(args["u"], args["delta"], args["A"], args["B"], args["C"], args.get("D"), args.get("z"),
              args.get("delta_bias"), initial_state=initial_state, backend=backend, **kwargs)


def replaced(**changes):
    def make():
        args = good_args()
        for name, fn in changes.items():
            args[name] = fn(args)
        return args
    return make


# (id, argument the message must name, exception, arguments factory)
CASES = [
    ("u-rank", "u", ValueError, replaced(u=lambda a: a["u"][0])),
    ("u-int", "u", TypeError, replaced(u=lambda a: a["u"].to(torch.int32))),
    ("u-empty-length", "u", ValueError, replaced(u=lambda a: a["u"][..., :0])),
    ("u-not-tensor", "u", TypeError, replaced(u=lambda a: a["u"].tolist())),
    ("delta-shape", "delta", ValueError, replaced(delta=lambda a: a["delta"][..., :-1])),
    ("delta-dtype", "delta", TypeError, replaced(delta=lambda a: a["delta"].half())),
    ("A-shape", "A", ValueError, replaced(A=lambda a: a["A"][:-1])),
    ("A-rank", "A", ValueError, replaced(A=lambda a: a["A"][0])),
    ("A-complex", "A", TypeError, replaced(A=lambda a: a["A"].to(torch.complex64))),
    ("B-fixed-shape", "B", ValueError, replaced(B=lambda a: torch.randn(4, 3, device=DEVICE))),
    ("B-variable-length", "B", ValueError, replaced(B=lambda a: a["B"][:, 0, :, :-1])),
    ("B-groups-not-dividing-dim", "B", ValueError, replaced(B=lambda a: torch.randn(2, 3, 4, 37, device=DEVICE))),
    ("B-rank", "B", ValueError, replaced(B=lambda a: a["B"][None])),
    ("C-groups-differ-from-B", "C", ValueError, replaced(C=lambda a: a["C"][:, :1])),
    ("C-batch", "C", ValueError, replaced(C=lambda a: a["C"][:1])),
    ("D-shape", "D", ValueError, replaced(D=lambda a: a["D"][:-1])),
    ("delta_bias-shape", "delta_bias", ValueError, replaced(delta_bias=lambda a: a["delta_bias"][None])),
    ("z-shape", "z", ValueError, replaced(z=lambda a: a["z"][:, :-1])),
    ("z-dtype", "z", TypeError, replaced(z=lambda a: a["z"].double())),
    ("initial_state-shape", "initial_state", ValueError, replaced(initial_state=lambda a: a["initial_state"][..., :-1])),
    ("B-device", "B", ValueError, replaced(B=lambda a: a["B"].to("meta"))),
    ("D-device", "D", ValueError, replaced(D=lambda a: a["D"].to("meta"))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,exc,make", [pytest.param(n, e, m, id=i) for i, n, e, m in CASES])
def test_bad_tensor(backend, name, exc, make):
    with pytest.raises(exc, match=rf"^{name}:"):
        call(backend, make())


def test_complex_A_says_not_supported_yet():
    with pytest.raises(TypeError, match="not supported yet"):
        call("torch", replaced(A=lambda a: a["A"].to(torch.complex64))())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multiplier", ["dt_scale", "b_scale", "c_scale"])
@pytest.mark.parametrize("value,exc", [
    pytest.param(math.nan, ValueError, id="nan"), pytest.param(math.inf, ValueError, id="inf"),
    pytest.param(-math.inf, ValueError, id="-inf"), pytest.param(torch.tensor(math.nan), ValueError, id="nan-tensor"),
    pytest.param(torch.ones(2), ValueError, id="1d-tensor"), pytest.param("2", TypeError, id="str"),
    pytest.param(None, TypeError, id="none"), pytest.param(torch.tensor(2.0, requires_grad=True), ValueError,
                                                           id="requires-grad"),
])
def test_bad_multiplier(backend, multiplier, value, exc):
    with pytest.raises(exc, match=rf"^{multiplier}:"):
        call(backend, good_args(), **{multiplier: value})


def test_ref_checks_its_inputs_too():
    with pytest.raises(ValueError, match="^delta:"):
        call(None, replaced(delta=lambda a: a["delta"][..., :-1])(), fn=selective_scan_ref)


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="^backend:"):
        call("gpu", good_args())
    monkeypatch.setenv("SSM_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="^SSM_KERNELS_BACKEND:"):
        call(None, good_args())


def test_triton_refuses_float64():
    args = {n: t.double() for n, t in good_args().items()}
    with pytest.raises(TypeError, match="^u: float64"):
        call("triton", args)


def test_triton_refuses_large_d_state():
    args = {n: t.detach() for n, t in as_leaves(make_inputs(dim=2, d_state=257, seqlen=3), torch.float32).items()}
    with pytest.raises(ValueError, match="^A: d_state=257"):
        call("triton", args)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU tensors only")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        call("triton", good_args())
