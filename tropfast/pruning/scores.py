"""Importance scores of adapter weights: larger means keep.

Every score maps the adapters' weights A_k: (r, d_in), B_k: (d_out, r) to tensors of the
same shapes.  Ties are broken by magnitude |W|, then by position (see ``allocation``).

* ``magnitude``     |W| (the paper's "standard" baseline)
* ``tropical``      |Â|, |B̂| from one batched ``tropfast.solve`` over every adapter (with
                    ``tropical={"lam_gen": x}`` the solve adds the generator l2,1 penalty, which
                    zeroes whole hidden units: ``structured`` then ranks units by that solution)
* ``combined``      tropical for the protected top-q of each group's budget, magnitude for
                    the rest (the fusion itself happens in ``allocation``)
* ``random``        uniform noise from a seeded generator
* ``snip``          |g ⊙ W| summed over a few batches (connection sensitivity)
* ``partner_norm``  |A_ik|·β_i and |B_ji|·a_i with a_i = ‖A_i‖², β_i = ‖B_{:,i}‖² (docs/design.md §2)
* ``grasp``         θ ⊙ (H g), signed (GraSP as SparseAdapter runs it, see ``_grasp``)
* ``synflow``       |θ ⊙ ∂R/∂θ| for R the summed output of every adapter's bottleneck on an
                    all-ones input with every parameter replaced by its absolute value
                    (one round; see ``synflow_scores``)

The data-dependent scores (``DATA_SCORES``: snip, grasp) differentiate ``loss_fn(model,
batch)`` (default: the model's own ``.loss``) over the first ``batches`` batches of ``data``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .._threads import intra_op_threads
from ..solver import solve

__all__ = [
    "GRADIENT_RANK_DEFAULTS",
    "SCORES",
    "all_finite",
    "check_tropical_options",
    "TROPICAL_DEFAULTS",
    "ScoreResult",
    "adapter_gradient_ranks",
    "compute_scores",
    "default_loss",
    "default_snip_loss",
    "synflow_scores",
    "tropical_lambdas",
]

SCORES = ("magnitude", "tropical", "combined", "random", "snip", "partner_norm", "grasp", "synflow")
DATA_SCORES = ("snip", "grasp")
"""Scores that need the model and batches of data (``data=``, ``loss_fn=``)."""
_ALIASES = {"standard": "magnitude", "partner-norm": "partner_norm", "partnernorm": "partner_norm"}

# The default tropical route: the paper's ISTA (Algorithm 1, safe step 1/L, T = 100) with a
# per-adapter search of the λ scale (``solver.MuSearch``) so the solution itself keeps about the requested
# fraction (``target=True``); the masks then keep the top entries of |Â|, |B̂|.  With
# ``target=False`` the λ are fixed at ``lam`` times the per-adapter scale of
# ``tropical_lambdas`` and the top fraction of |Â|, |B̂| is kept (the paper's fixed route).
# The masks take the exact top fraction anyway, so the search stops once every adapter's
# solution keeps within 2 points of the target, and float32 is enough; pass
# {"search_tol": 0.0, "dtype": "float64"} for more.
TROPICAL_DEFAULTS: dict[str, Any] = {
    "method": "ista",
    "steps": 100,
    "lam": 0.5,
    "lam_ratio": 1.0,  # λ2 scale relative to λ1 scale
    # the generator l2,1 penalty (whole hidden units to zero), relative to lam like lam_ratio:
    # λg = lam_gen·lam·mean_i(β_i‖A_i‖₂/‖B_{:,i}‖₁) (see ``tropical_lambdas``); 0: none
    "lam_gen": 0.0,
    "target": True,
    "lr": None,
    "backend": None,
    "search_iters": 16,
    "search_tol": 0.02,
    "dtype": "float32",
}


def all_finite(ts: list[Tensor]) -> list[bool]:
    """Whether each tensor is all finite, reading it once (a sum, one sync per device).

    A sum is finite when every entry is; the exact ``isfinite`` pass (twenty times a sum's
    cost on the CPU) runs only for a tensor whose sum is not: a NaN/Inf, or finite entries
    large enough to overflow the sum, which is float64 for float64 tensors and float32 (no
    conversion) for the narrower ones.
    """
    sums = [t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in ts]
    if not sums:
        return []
    if len({x.device for x in sums}) == 1:
        vals = torch.stack(sums).tolist()
    else:
        vals = [float(x) for x in sums]
    return [math.isfinite(v) or bool(torch.isfinite(t).all()) for v, t in zip(vals, ts)]


def _real(x: Any) -> float | None:
    """x as a float if it is a real number (numpy scalars, 0-d tensors), else None; bools are not numbers."""
    if isinstance(x, Tensor) and x.dim() == 0 and x.is_floating_point():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


def check_tropical_options(opts: dict | None) -> dict:
    """The tropical options merged over ``TROPICAL_DEFAULTS``, each checked; the error names the option."""
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise TypeError(f"tropical must be a dict of solver options, got {type(opts).__name__}")
    unknown = set(opts) - set(TROPICAL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tropical option(s) {sorted(unknown)}; known: {sorted(TROPICAL_DEFAULTS)}")
    o = dict(TROPICAL_DEFAULTS)
    o.update(opts)

    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"tropical option {key} must be {want}, got {o[key]!r}")

    if o["method"] not in ("ista", "fista", "bcd"):
        raise bad("method", "'ista', 'fista' or 'bcd'")
    for key in ("lam", "lam_ratio"):  # λ scales: a negative or zero one would be clamped silently
        v = _real(o[key])
        if v is None or not math.isfinite(v) or v <= 0:
            raise bad(key, "a finite number > 0")
        o[key] = v
    v = _real(o["lam_gen"])  # the generator penalty's scale: 0 turns it off
    if v is None or not math.isfinite(v) or v < 0:
        raise bad("lam_gen", "a finite number >= 0")
    o["lam_gen"] = v
    for key, lo in (("steps", 1), ("search_iters", 1 if o["target"] else 0)):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= int(v) < 2**63:
            raise bad(key, f"an integer >= {lo} below 2**63")
        o[key] = int(v)
    if not isinstance(o["target"], bool):
        raise bad("target", "True or False")
    if o["lr"] is not None:
        v = _real(o["lr"])
        if v is None or not math.isfinite(v) or v <= 0:
            raise bad("lr", "None or a finite number > 0")
        if o["method"] == "bcd":
            raise bad("lr", "None for method 'bcd' (it takes no step size)")
        o["lr"] = v
    v = _real(o["search_tol"])
    if v is None or not 0 <= v < 1:
        raise bad("search_tol", "in [0, 1)")
    o["search_tol"] = v
    if o["backend"] is not None and not isinstance(o["backend"], str):
        raise bad("backend", "None or a backend name")
    if o["dtype"] not in ("float32", "float64"):
        raise bad("dtype", "'float32' or 'float64'")
    return o


def canonical_score(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"score must be a string, one of {', '.join(SCORES)}; got {name!r}")
    key = name.lower().replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in SCORES:
        raise ValueError(f"score={name!r} is not a score; choose one of {', '.join(SCORES)}")
    return key


@dataclass
class ScoreResult:
    """Per adapter: scores (same shapes as A, B) and the tie-break magnitudes."""

    name: str
    SA: list[Tensor]
    SB: list[Tensor]
    MA: list[Tensor]  # |A|: the tie-break, and the fill for ``combined``
    MB: list[Tensor]
    A_hat: list[Tensor] | None = None  # the solver's values (tropical / combined)
    B_hat: list[Tensor] | None = None
    solver: dict | None = None
    time_s: float = 0.0
    extra: dict = field(default_factory=dict)


def generator_lambdas(As: list[Tensor], Bs: list[Tensor], lam: float, lam_gen: float) -> Tensor:
    """Scale-free weight of the generator penalty per adapter: lam_gen·lam·mean_i(β_i‖A_i‖₂/‖B_{:,i}‖₁).

    From (Â, B̂) = (A, B) the group prox removes unit i when ‖S_λ1(β_i A_i)‖₂ <= λg‖B_{:,i}‖₁, i.e.
    roughly when λg >= β_i‖A_i‖₂/‖B_{:,i}‖₁: the mean of that level over the units is the scale.
    """
    out = []
    for A, B in zip(As, Bs):
        beta = (B * B).sum(0)
        level = beta * torch.linalg.vector_norm(A, dim=1) / B.abs().sum(0).clamp_min(torch.finfo(B.dtype).tiny)
        out.append(lam_gen * lam * float(level.mean()))
    return torch.tensor(out, dtype=As[0].dtype, device=As[0].device)


def tropical_lambdas(As: list[Tensor], Bs: list[Tensor], lam: float, ratio: float = 1.0) -> tuple[Tensor, Tensor]:
    """Scale-free λ per adapter: λ1 = lam·mean(β)·mean|A|, λ2 = ratio·lam·mean(a)·mean|B|.

    At the fixed point β̂_i Â_i − s_i A_i = −λ1 sign(Â_i), so λ1 is measured in units of
    β·|A| (and λ2 in a·|B|); ``lam`` ≈ 1 removes nearly every weight.
    """
    # mean(β) = ‖B‖²/r, mean(a) = ‖A‖²/r, mean|A| = ‖A‖₁/(r·d_in): four sums per adapter, read
    # in one sync, on one thread: a sum over a whole matrix is split over the threads and
    # rounds differently with each count, and the solution would follow
    sums = []
    with intra_op_threads(1):
        for A, B in zip(As, Bs):
            for t in (A, B):
                v = t.reshape(-1)
                sums += [torch.dot(v, v), v.abs().sum()]
        vals = torch.stack(sums).tolist() if sums else []
    l1, l2 = [], []
    for k, (A, B) in enumerate(zip(As, Bs)):
        a2, a1, b2, b1 = vals[4 * k : 4 * k + 4]
        r = A.shape[0]
        if A.numel() == 0 or B.numel() == 0:
            l1.append(0.0)
            l2.append(0.0)
            continue
        l1.append(lam * (b2 / r) * (a1 / A.numel()))
        l2.append(ratio * lam * (a2 / r) * (b1 / B.numel()))
    dt = As[0].dtype
    t1 = torch.tensor(l1, dtype=dt, device=As[0].device)
    t2 = torch.tensor(l2, dtype=dt, device=As[0].device)
    tiny = torch.finfo(dt).tiny
    return t1.clamp_min(tiny), t2.clamp_min(tiny)


def _solver_diag(sol) -> dict:
    return {
        "method": sol.method,
        "backend": sol.backend,
        "steps": [int(x) for x in sol.steps.tolist()],
        "lam1": [float(x) for x in sol.lam1.tolist()],
        "lam2": [float(x) for x in sol.lam2.tolist()],
        "lr": None if sol.lr is None else [float(x) for x in sol.lr.tolist()],
        "objective_start": [float(x) for x in sol.objective[:, 0].tolist()],
        "objective_end": [float(x) for x in sol.objective[:, -1].tolist()],
        "lam_gen": None if sol.lam_gen is None else [float(x) for x in sol.lam_gen.tolist()],
        "solver_kept_fraction": [float(x) for x in sol.kept_fraction.tolist()],
        "search_iters": len(sol.search),
    }


_SOLVE_CACHE: OrderedDict[str, tuple] = OrderedDict()
_SOLVE_CACHE_SIZE = 8


def _fingerprint(As, Bs, target, o: dict) -> str:
    """Content hash of the solve's inputs: tropical and combined at one keep share a solve."""
    h = hashlib.sha1()
    for t in list(As) + list(Bs):
        h.update(str((tuple(t.shape), t.dtype, t.device.type)).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(repr((target, sorted((k, repr(v)) for k, v in o.items()))).encode())
    return h.hexdigest()


def _tropical(As, Bs, keep: float, opts: dict, progress: bool):
    o = check_tropical_options(opts)
    solved = [k for k, (a, b) in enumerate(zip(As, Bs)) if a.numel() and b.numel()]
    if len(solved) < len(As):  # adapters whose units were all removed: nothing to solve, nothing to score
        if not solved:
            return [a.clone() for a in As], [b.clone() for b in Bs], None
        Ah, Bh, diag = _tropical([As[k] for k in solved], [Bs[k] for k in solved], keep, opts, progress)
        outA, outB = [a.clone() for a in As], [b.clone() for b in Bs]
        for j, k in enumerate(solved):
            outA[k], outB[k] = Ah[j], Bh[j]
        return outA, outB, dict(diag, adapters_solved=solved)
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    out_dt = As[0].dtype
    As = [a.to(dtypes[o["dtype"]]) for a in As]
    Bs = [b.to(dtypes[o["dtype"]]) for b in Bs]
    lam1, lam2 = tropical_lambdas(As, Bs, float(o["lam"]), float(o["lam_ratio"]))
    lg = o["lam_gen"]
    if isinstance(lg, bool) or not isinstance(lg, (int, float)) or not lg >= 0 or lg == float("inf"):
        raise ValueError(f"tropical lam_gen must be a finite number >= 0, got {lg!r}")
    lam_gen = generator_lambdas(As, Bs, float(o["lam"]), float(lg)) if lg > 0 else 0.0
    target = keep if o["target"] else None
    if target is not None:
        target = min(max(float(target), 1e-6), 1.0)
    key = _fingerprint(As, Bs, target, o)
    if key in _SOLVE_CACHE:
        _SOLVE_CACHE.move_to_end(key)
        Ah, Bh, diag = _SOLVE_CACHE[key]
        return [a.to(out_dt) for a in Ah], [b.to(out_dt) for b in Bh], dict(diag, cached=True)
    sol = solve(
        list(As),
        list(Bs),
        lam1=lam1,
        lam2=lam2,
        method=o["method"],
        steps=int(o["steps"]),
        lr=o["lr"],
        target_keep=target,
        backend=o["backend"],
        search_iters=int(o["search_iters"]),
        search_tol=float(o["search_tol"]),
        progress=progress,
        record_every=0,
        lam_gen=lam_gen,
    )
    Ah = [a.to(out_dt) for a in (sol.A_hat if isinstance(sol.A_hat, list) else [sol.A_hat])]
    Bh = [b.to(out_dt) for b in (sol.B_hat if isinstance(sol.B_hat, list) else [sol.B_hat])]
    ok = all_finite([t for a, b in zip(Ah, Bh) for t in (a, b)])
    for k in range(len(Ah)):
        if not (ok[2 * k] and ok[2 * k + 1]):
            raise FloatingPointError(f"the tropical solver returned non-finite values for adapter #{k}")
    diag = _solver_diag(sol)
    diag["options"] = {k: v for k, v in o.items()}
    diag["target_keep"] = target
    diag["cached"] = False
    _SOLVE_CACHE[key] = ([a.clone() for a in Ah], [b.clone() for b in Bh], dict(diag))
    while len(_SOLVE_CACHE) > _SOLVE_CACHE_SIZE:
        _SOLVE_CACHE.popitem(last=False)
    return Ah, Bh, diag


def _batch_kwargs(batch: Any) -> dict | None:
    """A batch that names its fields as keyword arguments; None for a positional batch.

    Mappings of any kind (dict, a tokenizer's BatchEncoding, UserDict, transformers'
    ModelOutput), dataclass instances, named tuples and other objects with ``keys()`` and
    ``__getitem__`` name their fields; plain tuples, lists and tensors do not.
    """
    if isinstance(batch, Mapping):
        return {k: batch[k] for k in batch.keys()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return dict(batch._asdict())
    if isinstance(batch, (str, bytes, Tensor, tuple, list)):
        return None
    keys = getattr(batch, "keys", None)
    if callable(keys) and hasattr(batch, "__getitem__"):
        return {k: batch[k] for k in keys()}
    return None


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """The loss the data-dependent scores differentiate when no ``loss_fn`` is given.

    A batch with named fields (see ``_batch_kwargs``) is passed as ``model(**batch)``, a
    tuple or list as ``model(*batch)``, a tensor as ``model(batch)``; the loss is the
    output's ``loss`` (transformers models compute it when the batch holds ``labels``), or
    the output itself when the model returns a scalar tensor.
    """
    kwargs = _batch_kwargs(batch)
    if kwargs is not None:
        out = model(**kwargs)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    elif isinstance(batch, Tensor):
        out = model(batch)
    else:
        raise TypeError(
            f"data yielded a batch of type {type(batch).__name__}; a batch must be a mapping (dict, "
            "BatchEncoding), a dataclass, a tuple/list of positional arguments or a tensor; or pass "
            "loss_fn=lambda model, batch: loss"
        )
    if isinstance(out, Tensor) and out.dim() == 0:
        return out
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "the model output has no .loss (does the batch hold labels?): pass loss_fn=lambda model, batch: loss"
        )
    return loss


default_snip_loss = default_loss  # the name before GraSP shared it


def _take_batches(score: str, data: Iterable | None, batches: int) -> list:
    """The first ``batches`` batches of ``data`` as a list (GraSP reads them twice)."""
    if data is None:
        raise ValueError(
            f"score={score!r} needs data: pass data=<an iterable of batches> (alias snip_data) and, unless "
            "model(**batch).loss is the loss, loss_fn=lambda model, batch: loss"
        )
    if isinstance(data, Mapping) or (dataclasses.is_dataclass(data) and not isinstance(data, type)):
        # One batch, not an iterable of batches: iterating it would yield its field names.
        data = [data]
    out = []
    for batch in data:
        if len(out) >= batches:
            break
        out.append(batch)
    if not out:
        raise ValueError(f"score={score!r}: data yielded no batch")
    return out


def _scalar_loss(loss_fn: Callable, model: nn.Module, batch: Any) -> Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss


class _Differentiable:
    """Context for differentiating the model in the adapter weights: eval mode, the weights
    trainable, grad mode on; flags and mode restored on exit (no ``.grad`` is ever written:
    everything goes through ``torch.autograd.grad``)."""

    def __init__(self, model: nn.Module, params: list[Tensor]):
        self.model, self.params = model, params

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        self.was_training = self.model.training
        self.grad_mode = torch.is_grad_enabled()
        self.model.eval()
        for p in self.params:
            p.requires_grad_(True)
        torch.set_grad_enabled(True)  # callers often prune under torch.no_grad()
        return self

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad_mode)
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)
        self.model.train(self.was_training)
        return False


def _grads(model, params, batches: list, loss_fn: Callable, dtype: torch.dtype) -> list[Tensor]:
    """Σ_batches ∂loss/∂θ for every tensor of ``params``, in ``dtype``."""
    total = [torch.zeros_like(p, dtype=dtype) for p in params]
    for batch in batches:
        gs = torch.autograd.grad(_scalar_loss(loss_fn, model, batch), params, allow_unused=True)
        for acc, g in zip(total, gs):
            if g is not None:
                acc += g.detach().to(dtype)
    return total


def _snip(model, downs, ups, data, loss_fn, batches: int, dtype) -> tuple[list[Tensor], list[Tensor]]:
    """Σ_batches g, then |g ⊙ W|; uses autograd.grad so no .grad of the model changes."""
    data = _take_batches("snip", data, batches)
    params = [m.weight for m in downs] + [m.weight for m in ups]
    with _Differentiable(model, params):
        grads = _grads(model, params, data, loss_fn or default_loss, dtype)
    L = len(downs)
    S = [(g * p.detach().to(dtype)).abs() for g, p in zip(grads, params)]
    return S[:L], S[L:]


def _math_attention():
    """Scaled-dot-product attention by its composite (math) kernel, whose backward is itself
    differentiable: the fused CPU/CUDA kernels have no double backward, which GraSP needs."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: the default kernels are used
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _grasp(model, downs, ups, data, loss_fn, batches: int, dtype) -> tuple[list[Tensor], list[Tensor]]:
    """GraSP as SparseAdapter's pruners.py runs it: θ ⊙ (H g), signed.

    Pass 1 sums the gradients of every batch, g = Σ_b ∂L_b/∂θ, and stops them (no graph).
    Pass 2, per batch, takes ∂L_b/∂θ with its graph and differentiates ⟨g, ∂L_b/∂θ⟩ again:
    Σ_b H_b g = H g.  Larger θ ⊙ H g means keep, so pruning removes the largest −θ ⊙ H g
    (the weights whose removal, to second order, least reduces the gradient flow).
    SparseAdapter also divides by |Σ score|, which does not change the ranking.
    """
    data = _take_batches("grasp", data, batches)
    loss_fn = loss_fn or default_loss
    params = [m.weight for m in downs] + [m.weight for m in ups]
    with _Differentiable(model, params), _math_attention():
        stopped = _grads(model, params, data, loss_fn, dtype)
        hg = [torch.zeros_like(p, dtype=dtype) for p in params]
        for batch in data:
            gs = torch.autograd.grad(_scalar_loss(loss_fn, model, batch), params, create_graph=True, allow_unused=True)
            z = sum((g * s.to(g.dtype)).sum() for g, s in zip(gs, stopped) if g is not None)
            if not isinstance(z, Tensor) or not z.requires_grad:
                continue  # the loss is linear in the weights here: H g = 0
            for acc, h in zip(hg, torch.autograd.grad(z, params, allow_unused=True)):
                if h is not None:
                    acc += h.detach().to(dtype)
    L = len(downs)
    S = [h * p.detach().to(dtype) for h, p in zip(hg, params)]
    return S[:L], S[L:]


def synflow_scores(
    As: list[Tensor], Bs: list[Tensor], biases: list[Tensor | None] | None = None, scales: list | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """SynFlow, one round (as SparseAdapter runs it), in closed form: (S_A, S_B) per adapter.

    Every parameter is replaced by its absolute value and an all-ones vector is fed to each
    adapter's down-projection; R is the sum of every adapter's up-projection output and the
    score is |θ ⊙ ∂R/∂θ|.  With nonnegative weights and input the ReLU passes everything, so
    with h_i = Σ_k |A_ik| + |a_i| (a: the down-projection bias) and w_j the adapter's output
    scaling (1 when it has none):

        S_A[i, k] = |A_ik| · Σ_j w_j |B_ji|        S_B[j, i] = w_j |B_ji| · h_i

    The ones go to the down-projection itself, after any input LayerNorm the adapter has
    (AdapterHub ``ln_before=True``): a LayerNorm maps an all-ones vector to its bias, zero at
    initialisation, which would make every score zero.  The default ``seq_bn`` adapter has
    no such LayerNorm, so there the choice changes nothing.  Within a unit the score of A_ik
    is |A_ik| times the unit's partner L1 norm, a first-order "partner norm" score.
    biases: per adapter the (r,) down-projection bias or None; scales: per adapter a number or
    a (d_out,) tensor.
    """
    SA, SB = [], []
    for k, (A, B) in enumerate(zip(As, Bs)):
        a = biases[k] if biases is not None else None
        w = scales[k] if scales is not None else 1.0
        w = (w.detach().to(B) if isinstance(w, Tensor) else torch.tensor(float(w), dtype=B.dtype, device=B.device)).abs()
        wcol = w.reshape(-1, 1) if w.dim() == 1 else w  # (d_out, 1) or ()
        h = A.abs().sum(1)
        if a is not None:
            h = h + a.detach().to(A).abs()
        WB = wcol * B.abs()  # (d_out, r)
        SA.append(A.abs() * WB.sum(0)[:, None])
        SB.append(WB * h[None, :])
    return SA, SB


def _alias(new, old, new_name: str, old_name: str):
    if old is None:
        return new
    if new is not None and new is not old:
        raise ValueError(f"{new_name}= and its alias {old_name}= were both given; pass one")
    return old


def compute_scores(
    name: str,
    As: list[Tensor],
    Bs: list[Tensor],
    keep: float,
    *,
    seed: int = 0,
    tropical: dict | None = None,
    model: nn.Module | None = None,
    downs: list[nn.Module] | None = None,
    ups: list[nn.Module] | None = None,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    data_batches: int | None = None,
    snip_data: Iterable | None = None,
    snip_loss_fn: Callable | None = None,
    snip_batches: int | None = None,
    scales: list | None = None,
    progress: bool = False,
) -> ScoreResult:
    """Scores of every adapter.  As[k]: (r_k, d_in_k), Bs[k]: (d_out_k, r_k), already validated.

    data / loss_fn / data_batches: for the data-dependent scores (snip, grasp); snip_data,
    snip_loss_fn and snip_batches are their older names.  scales: per adapter its output
    scaling (synflow).  downs / ups: the adapters' Linear modules (snip, grasp; synflow reads
    the down-projection biases from them).
    """
    name = canonical_score(name)
    data = _alias(data, snip_data, "data", "snip_data")
    loss_fn = _alias(loss_fn, snip_loss_fn, "loss_fn", "snip_loss_fn")
    batches = _alias(data_batches, snip_batches, "data_batches", "snip_batches")
    batches = 4 if batches is None else batches
    if name in DATA_SCORES and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"data_batches must be a positive integer, got {batches!r}")
    t0 = time.perf_counter()
    MA = [a.abs() for a in As]
    MB = [b.abs() for b in Bs]
    res = ScoreResult(name, MA, MB, MA, MB)
    if name == "magnitude":
        pass
    elif name in ("tropical", "combined"):
        Ah, Bh, diag = _tropical(As, Bs, keep, tropical or {}, progress)
        res.SA = [a.abs() for a in Ah]
        res.SB = [b.abs() for b in Bh]
        res.A_hat, res.B_hat, res.solver = Ah, Bh, diag
    elif name == "random":
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        res.SA = [torch.rand(a.shape, generator=g, dtype=a.dtype).to(a.device) for a in As]
        res.SB = [torch.rand(b.shape, generator=g, dtype=b.dtype).to(b.device) for b in Bs]
    elif name == "partner_norm":
        res.SA, res.SB = [], []
        for A, B in zip(As, Bs):
            a = (A * A).sum(1)  # (r,)
            beta = (B * B).sum(0)  # (r,)
            res.SA.append(A.abs() * beta[:, None])
            res.SB.append(B.abs() * a[None, :])
    elif name == "synflow":
        biases = [getattr(m, "bias", None) for m in downs] if downs is not None else None
        res.SA, res.SB = synflow_scores(As, Bs, biases, scales)
    elif name in DATA_SCORES:
        if model is None or downs is None or ups is None:
            raise ValueError(f"score={name!r} needs the model")
        fn = _snip if name == "snip" else _grasp
        res.SA, res.SB = fn(model, downs, ups, data, loss_fn, batches, As[0].dtype)
        res.extra["data_batches"] = batches
    if name in ("snip", "grasp", "synflow", "partner_norm"):
        # products of finite weights (and gradients) can still overflow; |W|, uniform noise and
        # the solver's checked values cannot, so those are not read again
        ok = all_finite([t for sa, sb in zip(res.SA, res.SB) for t in (sa, sb)])
        for k in range(len(res.SA)):
            if not (ok[2 * k] and ok[2 * k + 1]):
                raise FloatingPointError(f"score {name!r} is not finite for adapter #{k}")
    res.time_s = time.perf_counter() - t0
    return res


# allocation="gradient_rank": the numerical rank of each adapter's gradient G_k = Σ δ xᵀ
# counts singular values above rtol·σ_max (as torch.linalg.matrix_rank does); 1e-2 because
# with a few thousand tokens G_k is full rank at machine precision (see tropfast.placement).
GRADIENT_RANK_DEFAULTS: dict[str, Any] = {"rtol": 1e-2, "batches": 4}


def adapter_gradient_ranks(
    model: nn.Module,
    modules: list[nn.Module],
    data: Iterable,
    loss_fn: Callable | None = None,
    *,
    batches: int = 4,
    rtol: float = 1e-2,
) -> dict[str, list]:
    """Gradient rank of each adapter: rank of G_k = ∂L/∂W_k = Σ_tokens δ_k x_kᵀ.

    W_k is a zero linear map added to the adapter's output, x_k the adapter's input (its first
    positional argument) and δ_k the gradient of the loss at the adapter's output (its first
    output), summed over the first ``batches`` of ``data`` (non-padding tokens only, where a
    dict batch carries ``attention_mask``).  One forward and one backward per batch for all
    adapters; parameters get no gradient and the model's flags and mode are restored.
    Returns {"rank", "max_rank", "fro", "tokens"}: per adapter lists, and the token count.
    """
    if data is None:
        raise ValueError(
            "allocation='gradient_rank' needs data: pass data=<an iterable of batches> (and loss_fn if "
            "model(**batch).loss is not the loss)"
        )
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"gradient_rank batches must be a positive integer, got {batches!r}")
    if not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        raise ValueError(f"gradient_rank rtol must lie in [0, 1), got {rtol!r}")
    if loss_fn is None:
        loss_fn = default_snip_loss  # any batch SNIP takes (a BatchEncoding, a dataclass, a tuple, ...)

    calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in modules]

    def make_hook(k: int):
        def hook(module, args, output):
            x = args[0] if args else None
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(x, Tensor) or not isinstance(out, Tensor):
                raise TypeError(f"adapter #{k} ({type(module).__name__}): expected a tensor input and output")
            z = torch.zeros_like(out, requires_grad=True)
            calls[k].append((x, z))
            if isinstance(output, tuple):
                return (out + z,) + tuple(output[1:])
            if isinstance(output, list):
                return [out + z] + list(output[1:])
            return out + z

        return hook

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    handles = [m.register_forward_hook(make_hook(k)) for k, m in enumerate(modules)]
    G: list[Tensor | None] = [None] * len(modules)
    tokens = 0
    n = 0
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        for batch in data:
            if n >= batches:
                break
            for c in calls:
                c.clear()
            with torch.enable_grad():
                loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a scalar tensor")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss of batch {n} is {float(loss.detach())}")
            flat = [(k, x, z) for k, c in enumerate(calls) for x, z in c]
            if not flat:
                raise RuntimeError("the forward pass ran none of the adapters")
            grads = torch.autograd.grad(loss, [z for _, _, z in flat], allow_unused=True)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            for (k, x, z), g in zip(flat, grads):
                d = torch.zeros_like(z) if g is None else g.detach()
                x = x.detach()
                if mask is not None and d.dim() == 3 and x.dim() == 3 and tuple(mask.shape) == tuple(d.shape[:2]):
                    m = mask.to(d.device).bool()
                    d, x = d[m], x[m]
                else:
                    d, x = d.reshape(-1, d.shape[-1]), x.reshape(-1, x.shape[-1])
                if d.shape[0] != x.shape[0]:
                    raise ValueError(f"adapter #{k}: its input and output hold different numbers of tokens")
                gk = (d.T @ x.to(d.dtype)).to(torch.float64)
                G[k] = gk if G[k] is None else G[k] + gk
            tokens += int(mask.sum()) if mask is not None else int(flat[0][2].numel() // flat[0][2].shape[-1])
            n += 1
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise ValueError("data yielded no batch")
    ranks, max_ranks, fros = [], [], []
    threads = torch.get_num_threads()
    for k, g in enumerate(G):
        if g is None:
            raise RuntimeError(f"adapter #{k} ({type(modules[k]).__name__}) never ran in the forward pass")
        try:  # MKL's threaded SVD stalls on a shared CPU and gains nothing at these sizes
            torch.set_num_threads(1)
            sv = torch.linalg.svdvals(g)
        finally:
            torch.set_num_threads(threads)
        ranks.append(int((sv > float(rtol) * float(sv.max())).sum()) if sv.numel() else 0)
        max_ranks.append(min(g.shape[0], g.shape[1], tokens))
        fros.append(float(torch.linalg.matrix_norm(g)))
    return {"rank": ranks, "max_rank": max_ranks, "fro": fros, "tokens": tokens}
