"""Width-scaling presets: one table per (preset, optimizer).

For every parameter role a `Rule` gives, for four quantities, the exponents (e_u, e_x) of
N_u = d_inner and N_x = d_state relative to a base shape (N_u0, N_x0):

    value(N_u, N_x) = value at the base shape * (N_u / N_u0)**e_u * (N_x / N_x0)**e_x

  init  the init std (the base value is SP's, i.e. mamba_ssm's, at the base shape);
  mult  a forward multiplier (base value 1);
  lr    the learning rate (base value: the learning rate you pass);
  wd    the weight decay (base value: the weight decay you pass; 0 for roles that never decay).

So at the base shape every preset is SP. The derivations are in docs/mup_ssm.md; the coordinate
check (`python -m ssm_kernels coord-check`) measures them.
"""

from fractions import Fraction
from typing import Dict, NamedTuple, Tuple

Exp = Tuple[float, float]  # (exponent of N_u / N_u0, exponent of N_x / N_x0)
ZERO: Exp = (0.0, 0.0)

ROLES = (
    "embedding",       # backbone.embedding.weight
    "in_proj",         # mixer.in_proj.weight (2 N_u x d_model)
    "in_proj_bias",
    "conv_weight",     # mixer.conv1d.weight: per-channel causal filters
    "conv_bias",
    "x_proj_dt",       # mixer.x_proj.weight rows [0, dt_rank): the low-rank dt input
    "x_proj_B",        # rows [dt_rank, dt_rank + N): W_B
    "x_proj_C",        # rows [dt_rank + N, dt_rank + 2N): W_C
    "dt_proj_weight",  # mixer.dt_proj.weight (N_u x dt_rank)
    "dt_proj_bias",    # mixer.dt_proj.bias: softplus^-1 of the initial step sizes
    "A_log",           # mixer.A_log (N_u x N_x), S4D-real
    "D",               # mixer.D
    "out_proj",        # mixer.out_proj.weight (d_model x N_u)
    "out_proj_bias",
    "norm",            # RMSNorm weights
    "readout",         # lm_head.weight
)
# Roles whose init is structured or constant (not a random draw with a std to scale).
STRUCTURED = ("dt_proj_bias", "A_log", "D", "norm", "in_proj_bias", "out_proj_bias")
# Roles with a forward multiplier: dt, B, C go to the kernel (dt_scale = mult(x_proj_dt) *
# mult(dt_proj_weight), b_scale, c_scale); embedding and readout are applied by MambaLM.
MULTIPLIED = ("x_proj_dt", "dt_proj_weight", "x_proj_B", "x_proj_C", "embedding", "readout")
# Roles that take weight decay (mamba_ssm: no decay on A_log, D; usual practice: none on biases, norms).
DECAYED = ("embedding", "in_proj", "conv_weight", "x_proj_dt", "x_proj_B", "x_proj_C", "dt_proj_weight",
           "out_proj", "readout")
OPTIMIZERS = ("adam", "sgd")


class Rule(NamedTuple):
    init: Exp = ZERO
    mult: Exp = ZERO
    lr: Exp = ZERO
    wd: Exp = ZERO


def _table(default: Rule, **rules: Rule) -> Dict[str, Rule]:
    unknown = set(rules) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")
    return {role: rules.get(role, default) for role in ROLES}


H = -0.5
# Fan-in of in_proj, x_proj, dt_proj, out_proj and lm_head grows like N_u: SP's (PyTorch's and
# mamba_ssm's) init std 1/sqrt(3 fan_in) is exponent -1/2 of N_u.
_SP_INIT = dict(in_proj=(H, 0), x_proj_dt=(H, 0), x_proj_B=(H, 0), x_proj_C=(H, 0), dt_proj_weight=(H, 0),
                out_proj=(H, 0), readout=(H, 0))


def _sp():
    return _table(Rule(), **{role: Rule(init=e) for role, e in _SP_INIT.items()})


def _mup(optimizer):
    """Heuristic muP (Tensor Programs V, Table 3 with a 1/fan_in readout multiplier). W_B and W_C are
    ordinary matrices: output-like in N_u (fan_in N_u, fan_out N_x fixed), input-like in N_x."""
    hidden = dict(init=(H, 0), lr=(-1, 0) if optimizer == "adam" else (0, 0))
    vector = Rule(lr=(0, 0) if optimizer == "adam" else (1, 0))
    bc = Rule(init=(-1, 0), lr=(-1, 0) if optimizer == "adam" else (-1, 1))
    return _table(vector, embedding=vector, in_proj=Rule(**hidden), x_proj_dt=Rule(**hidden),
                  dt_proj_weight=Rule(**hidden), out_proj=Rule(**hidden), x_proj_B=bc, x_proj_C=bc,
                  readout=Rule(init=(H, 0), mult=(-1, 0), lr=(0, 0) if optimizer == "adam" else (1, 0)))


def _spectral(optimizer):
    """Yang-Simon-Bernstein spectral scaling: init std (1/sqrt(fan_in)) min(1, sqrt(fan_out/fan_in)),
    learning rate 1/fan_in (Adam) or fan_out/fan_in (SGD); vectors as 1-column matrices."""
    adam = optimizer == "adam"
    hidden = Rule(init=(H, 0), lr=(-1, 0) if adam else (0, 0))
    vector = Rule(lr=(0, 0) if adam else (1, 0))
    # W_B, W_C: N_x x N_u with N_x << N_u: std sqrt(N_x) / N_u.
    bc = Rule(init=(-1, 0.5), lr=(-1, 0) if adam else (-1, 1))
    return _table(vector, embedding=vector, in_proj=hidden, x_proj_dt=hidden, dt_proj_weight=hidden,
                  out_proj=hidden, x_proj_B=bc, x_proj_C=bc, readout=Rule(init=(-1, 0), lr=(-1, 0)))


def _mup_ssm(optimizer, asymptotic=False):
    """muP-SSM: muP for everything outside the selection; W_B, W_C scaled for the recurrence.

    N_u: W_B, W_C keep SP's init (B_t and C_t stay Theta(1)); learning rates measured (docs/mup_ssm.md).
    N_x: y_t = sum_n C_t[n] x_t[n] sums N_x terms whose size falls like N_x^s per coordinate
    (s = 0 once N_x >> 1/dt: the asymptotic regime; s ~ -1/4 at N_x 16..128, where high states
    decay fast: the pre-asymptotic regime). Then W_C's init std goes like N_x^-(1+2s)/2, its Adam
    learning rate like N_x^-(1+s) (Adam's update of C is the same size for every n, summed
    coherently against x), its SGD learning rate like N_x^-(1+2s) (the gradient is proportional to
    x[n]); W_B and A_log (SGD) make up for the smaller C in their gradients. "mup_ssm" follows the
    pre-asymptotic regime (s = -1/4), "mup_ssm_asymptotic" the asymptotic one (s = 0)."""
    table = _mup(optimizer)
    adam = optimizer == "adam"
    s = 0.0 if asymptotic else -0.25
    c_init = -(1 + 2 * s) / 2
    table["x_proj_B"] = Rule(init=(H, 0), lr=(-1, 0) if adam else (-0.5, -c_init))
    table["x_proj_C"] = Rule(init=(H, c_init), lr=(-0.75, -(1 + s)) if adam else (-0.5, -(1 + 2 * s)))
    if not adam:
        table["A_log"] = Rule(lr=(1, -c_init))
    return table


# A readout tied to the embedding (one Parameter, as in mamba_ssm's and transformers' defaults) gets
# the embedding's init, learning rate and weight decay, and the logits get the forward multiplier
# TIED[preset] (exponents as a Rule's). sp: none. spectral: N_u^-1, the abc-symmetry image of its
# untied readout (init N_u^-1, lr N_u^-1 moved to the embedding's init 1, lr 1 with Adam, lr N_u with
# SGD: the same t = 1 for both). mup, mup_ssm: the 1/N_u readout multiplier (microsoft/mup's
# MuSharedReadout): the readout then starts smaller than the untied table's, also a muP limit.
TIED: Dict[str, Exp] = {"sp": ZERO, "mup": (-1.0, 0.0), "spectral": (-1.0, 0.0), "mup_ssm": (-1.0, 0.0),
                        "mup_ssm_asymptotic": (-1.0, 0.0)}

PRESETS = {
    name: {opt: build(opt) for opt in OPTIMIZERS}
    for name, build in (("sp", lambda opt: _sp()), ("mup", _mup), ("spectral", _spectral), ("mup_ssm", _mup_ssm),
                        ("mup_ssm_asymptotic", lambda opt: _mup_ssm(opt, asymptotic=True)))
}


def check_table(table: Dict[str, Rule]) -> None:
    """Structured roles keep their init, only MULTIPLIED roles have multipliers, x_proj's rows share wd."""
    if set(table) != set(ROLES):
        raise ValueError(f"a table needs exactly the roles {ROLES}")
    for role, rule in table.items():
        if role in STRUCTURED and tuple(rule.init) != ZERO:
            raise ValueError(f"{role}: its init is structured, its init exponents must be 0")
        if role not in MULTIPLIED and tuple(rule.mult) != ZERO:
            raise ValueError(f"{role}: no forward multiplier is applied to this role")
    if not table["x_proj_dt"].wd == table["x_proj_B"].wd == table["x_proj_C"].wd:
        raise ValueError("x_proj_dt, x_proj_B, x_proj_C: one Parameter, so one weight decay")


def share_learning_rate(table: Dict[str, Rule], optimizer: str) -> Dict[str, Rule]:
    """The rows of x_proj are one Parameter, so one learning rate: move each of the B and C rows to
    the dt rows' learning rate with the abc symmetry, which leaves the function and its training
    dynamics unchanged. A weight W = n^-a w with init std n^-b and learning rate n^-c trains the
    same under (a, b, c) -> (a + t, b - t, c - t) with Adam and (a + t, b - t, c - 2t) with SGD.
    In exponents of n (ours have the opposite sign): mult -= t, init += t, lr += t (Adam) or 2t (SGD),
    with t chosen so that lr becomes the dt rows'. The forward multiplier that absorbs the difference
    goes to the kernel as b_scale / c_scale. (Weight decay stays the dt rows'; Adam's epsilon breaks
    the symmetry only when gradients are near it.)"""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    out = dict(table)
    anchor = table["x_proj_dt"].lr
    per_lr = 1.0 if optimizer == "adam" else 2.0
    for role in ("x_proj_B", "x_proj_C"):
        rule = table[role]
        t = tuple((anchor[i] - rule.lr[i]) / per_lr for i in range(2))
        out[role] = Rule(init=tuple(rule.init[i] + t[i] for i in range(2)),
                         mult=tuple(rule.mult[i] - t[i] for i in range(2)),
                         lr=tuple(anchor), wd=rule.wd)
    return out


def _fmt(e: Exp) -> str:
    def one(v, sym):
        if v == 0:
            return ""
        if v == 1:
            return sym
        return f"{sym}^{Fraction(v).limit_denominator(64)}"
    parts = [p for p in (one(e[0], "N_u"), one(e[1], "N_x")) if p]
    return " ".join(parts) or "1"


def presets_markdown() -> str:
    """Every preset's table as markdown (docs/presets.md is this text; a test keeps them equal)."""
    lines = ["# Parameterization presets", "",
             "Generated from `ssm_kernels/mup/presets.py` by `python -m ssm_kernels docs`; do not",
             "edit by hand. Each entry is the factor relative to the base shape (N_u0, N_x0), where every preset",
             "is SP: `N_u` stands for N_u / N_u0 and `N_x` for N_x / N_x0. init: the init std (SP's at the base",
             "shape is mamba_ssm's); mult: forward multiplier; lr: learning rate; wd: weight decay. These are",
             "the tables as written; `share_learning_rate` then moves the B and C rows of x_proj to the dt",
             "rows' learning rate (one Parameter, one param group) with the abc symmetry, which puts the",
             "difference into the kernel's b_scale / c_scale and into the init. Derivations: docs/mup_ssm.md.",
             ""]
    for name, per_opt in PRESETS.items():
        for opt, table in per_opt.items():
            lines += [f"## {name}, {opt}", "", "| role | init | mult | lr | wd |", "|---|---|---|---|---|"]
            lines += [f"| {role} | {_fmt(r.init)} | {_fmt(r.mult)} | {_fmt(r.lr)} | {_fmt(r.wd)} |"
                      for role, r in table.items()]
            shared = share_learning_rate(table, opt)
            lines += ["", f"Tied embedding and readout: the embedding's init, lr and wd; readout multiplier "
                      f"{_fmt(TIED[name])}.", ""]
            lines += ["As applied (x_proj's rows at the dt rows' learning rate): "
                      + "; ".join(f"{role} init {_fmt(shared[role].init)}, mult {_fmt(shared[role].mult)}, "
                                  f"lr {_fmt(shared[role].lr)}" for role in ("x_proj_B", "x_proj_C")) + ".", ""]
    return "\n".join(lines)
