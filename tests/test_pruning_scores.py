"""SNIP takes its batches in every common form: a tokenizer's BatchEncoding, any mapping,
dataclasses and model outputs, named tuples, keyed objects, tuples and lists.

The expectation is computed here by hand: the loss of ``model(**plain_dict)`` (or
``model(*args)``), its gradient by ``torch.autograd.grad``, summed over the batches, times
the weights, in absolute value.
"""
from __future__ import annotations

import collections
import dataclasses

import pytest
from pruning_fixtures import tiny_model, torch
from tiny_model_dir import tiny_tokenizer

from tropfast.pruning import find_adapters, kept_count, prune
from tropfast.pruning.scores import compute_scores, default_snip_loss

TEXTS = [
    ["the movie is good and funny", "a bad film , too long", "great story , best drama", "not funny at all"],
    ["the director makes it work", "no fun , no story", "love this comedy", "the script is bad"],
]
LABELS = [[1, 0, 1, 0], [1, 0, 1, 0]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("vocab")))


def _encodings(tok):
    """Real tokenizer output: BatchEncoding objects (a UserDict, not a dict) with labels."""
    out = []
    for texts, labels in zip(TEXTS, LABELS):
        enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        enc["labels"] = torch.tensor(labels)
        out.append(enc)
    return out


def _expected(model, plain_batches):
    """Σ_batches ∂loss/∂W by autograd on model(**dict), then |g ⊙ W| per adapter."""
    infos = find_adapters(model)
    params = [i.down.weight for i in infos] + [i.up.weight for i in infos]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    total = [torch.zeros_like(p) for p in params]
    for b in plain_batches:
        loss = model(**b).loss
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    S = [(g * p.detach()).abs() for g, p in zip(total, params)]
    return S[: len(infos)], S[len(infos) :]


def _snip(model, batches):
    infos = find_adapters(model)
    As = [i.down.weight.detach().clone() for i in infos]
    Bs = [i.up.weight.detach().clone() for i in infos]
    return compute_scores(
        "snip", As, Bs, 0.5, model=model, downs=[i.down for i in infos], ups=[i.up for i in infos],
        snip_data=batches, snip_batches=len(batches) if isinstance(batches, list) else 4,
    )


def _same(res, expected):
    eA, eB = expected
    assert len(res.SA) == len(eA) == 4
    for got, want in zip(res.SA + res.SB, eA + eB):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert sum(float(t.sum()) for t in eA + eB) > 0  # the reference is not trivially zero


@dataclasses.dataclass
class DataclassBatch:
    input_ids: object
    attention_mask: object
    token_type_ids: object
    labels: object


Named = collections.namedtuple("Named", ["input_ids", "attention_mask", "token_type_ids", "labels"])


class Keyed:
    """Neither a Mapping nor a dataclass: only keys() and __getitem__."""

    def __init__(self, d):
        self._d = dict(d)

    def keys(self):
        return self._d.keys()

    def __getitem__(self, k):
        return self._d[k]


def _as(kind: str, enc):
    from transformers.utils import ModelOutput

    d = {k: enc[k] for k in enc.keys()}
    if kind == "batch_encoding":
        return enc
    if kind == "userdict":
        return collections.UserDict(d)
    if kind == "dict":
        return d
    if kind == "model_output":
        return ModelOutput(d)
    if kind == "dataclass":
        return DataclassBatch(**d)
    if kind == "namedtuple":
        return Named(**d)
    if kind == "keyed":
        return Keyed(d)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["batch_encoding", "userdict", "dict", "model_output", "dataclass", "namedtuple", "keyed"]
)
def test_snip_takes_every_keyed_batch(tok, kind):
    model = tiny_model()
    encs = _encodings(tok)
    assert type(encs[0]).__name__ == "BatchEncoding" and not isinstance(encs[0], dict)
    expected = _expected(model, [{k: e[k] for k in e.keys()} for e in encs])
    _same(_snip(model, [_as(kind, e) for e in encs]), expected)


def test_snip_batch_encoding_through_prune(tok):
    """The reported crash: prune(score="snip") on tokenizer batches; exact counts per adapter."""
    model = tiny_model()
    encs = _encodings(tok)
    with torch.no_grad():  # callers often prune under no_grad
        rep = prune(model, keep=0.3, score="snip", allocation="layer", snip_data=encs, snip_batches=2)
    assert [a["kept_A"] + a["kept_B"] for a in rep.to_dict()["adapters"]] == [kept_count(0.3, 512)] * 4 == [154] * 4
    # the kept weights are the top SNIP scores of each adapter
    eA, eB = _expected(tiny_model(), [{k: e[k] for k in e.keys()} for e in encs])
    for info, sa, sb in zip(find_adapters(model), eA, eB):
        kept = torch.cat([(info.down.weight != 0).flatten(), (info.up.weight != 0).flatten()])
        s = torch.cat([sa.flatten(), sb.flatten()])
        assert int(kept.sum()) == 154 and s[kept].min() >= s[~kept].max()


def test_a_single_mapping_is_one_batch(tok):
    model = tiny_model()
    enc = _encodings(tok)[0]
    expected = _expected(model, [{k: enc[k] for k in enc.keys()}])
    _same(_snip(model, enc), expected)


class TupleNet(torch.nn.Module):
    """A plain PyTorch model whose forward takes (x, y) and returns the scalar loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.adapter = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 6))

    def forward(self, x, y):
        return ((x + self.adapter(x) - y) ** 2).mean()


@pytest.mark.parametrize("container", [tuple, list])
def test_snip_takes_positional_batches(container):
    net = TupleNet()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)) for _ in range(2)]
    down, up = net.adapter[0], net.adapter[2]
    gA = torch.zeros_like(down.weight)
    gB = torch.zeros_like(up.weight)
    for x, y in data:
        a, b = torch.autograd.grad(net(x, y), [down.weight, up.weight])
        gA += a
        gB += b
    res = compute_scores(
        "snip", [down.weight.detach()], [up.weight.detach()], 0.5, model=net, downs=[down], ups=[up],
        snip_data=[container(b) for b in data], snip_batches=2,
    )
    torch.testing.assert_close(res.SA[0], (gA * down.weight.detach()).abs())
    torch.testing.assert_close(res.SB[0], (gB * up.weight.detach()).abs())
    # and through prune with a name pattern: round(0.5 * 36) = 18 weights kept
    rep = prune(net, keep=0.5, score="snip", pattern="adapter", snip_data=[container(b) for b in data], snip_batches=2)
    assert rep.to_dict()["kept"] == 18
    assert int((down.weight != 0).sum() + (up.weight != 0).sum()) == 18


def test_snip_errors_name_the_problem(tok):
    model = tiny_model()
    with pytest.raises(TypeError, match="data yielded a batch of type int"):
        _snip(model, [3])
    enc = _encodings(tok)[0]
    del enc["labels"]
    with pytest.raises(ValueError, match="labels"):
        _snip(model, [enc])
    with pytest.raises(ValueError, match="no .loss"):
        default_snip_loss(lambda **kw: (torch.zeros(()),), {"x": 1})


# ---------------------------------------------------------------------------------------
# data= / loss_fn= (snip_data / snip_loss_fn remain as aliases)
# ---------------------------------------------------------------------------------------
def test_data_and_loss_fn_are_the_snip_arguments(tok):
    encs = _encodings(tok)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return model(**batch).loss * 2.0

    a = prune(tiny_model(), 0.3, "snip", data=encs, loss_fn=loss_fn, data_batches=2, inplace=False).model
    b = prune(tiny_model(), 0.3, "snip", snip_data=encs, snip_loss_fn=loss_fn, snip_batches=2, inplace=False).model
    assert len(calls) == 4  # two batches, each run
    for x, y in zip(find_adapters(a), find_adapters(b)):
        assert torch.equal(x.down.weight, y.down.weight) and torch.equal(x.up.weight, y.up.weight)
    with pytest.raises(ValueError, match="data= and its alias snip_data= were both given"):
        prune(tiny_model(), 0.3, "snip", data=encs, snip_data=list(encs))
    with pytest.raises(ValueError, match="data_batches must be a positive integer"):
        prune(tiny_model(), 0.3, "grasp", data=encs, data_batches=0)
    with pytest.raises(ValueError, match="score='grasp' needs data"):
        prune(tiny_model(), 0.3, "grasp")


# ---------------------------------------------------------------------------------------
# GraSP: θ ⊙ (H g), H the Hessian of the summed loss, g its gradient (SparseAdapter's pruners.py)
# ---------------------------------------------------------------------------------------
def test_grasp_is_theta_times_hessian_gradient_product():
    """Against the full Hessian of the summed loss, built by torch.autograd.functional.hessian
    on the flattened adapter weights of a small plain-PyTorch network (with a second layer so
    the Hessian has cross terms)."""
    net = TupleNet()
    net.double()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64))
            for _ in range(3)]
    down, up = net.adapter[0], net.adapter[2]
    wA, wB = down.weight.detach().clone(), up.weight.detach().clone()
    nA = wA.numel()

    def total_loss(flat):
        A, B = flat[:nA].view_as(wA), flat[nA:].view_as(wB)
        out = 0
        for x, y in data:
            h = torch.relu(x @ A.T + down.bias.detach())
            out = out + ((x + h @ B.T + up.bias.detach() - y) ** 2).mean()
        return out

    flat = torch.cat([wA.flatten(), wB.flatten()])
    H = torch.autograd.functional.hessian(total_loss, flat)
    grad = torch.autograd.functional.jacobian(total_loss, flat)
    want = flat * (H @ grad)
    assert float(want.abs().max()) > 1e-3  # the Hessian-gradient product is not trivially zero
    res = compute_scores("grasp", [wA], [wB], 0.5, model=net, downs=[down], ups=[up], data=data, data_batches=3)
    torch.testing.assert_close(torch.cat([res.SA[0].flatten(), res.SB[0].flatten()]), want, rtol=1e-10, atol=1e-12)
    # signed: both signs occur, and the larger values are the kept ones
    assert bool((want > 0).any()) and bool((want < 0).any())
    rep = prune(net, keep=0.5, score="grasp", pattern="adapter", data=data, data_batches=3)
    kept = torch.cat([(down.weight != 0).flatten(), (up.weight != 0).flatten()])
    assert int(kept.sum()) == 18 and rep.kept == 18
    assert want[kept].min() >= want[~kept].max()


def test_grasp_through_attention_matches_finite_differences(tok):
    """On the tiny BERT (float64): H g by central differences of the gradient along g.  The
    double backward runs through scaled-dot-product attention, which needs its math kernel."""
    model = tiny_model().double()
    encs = _encodings(tok)
    infos = find_adapters(model)
    params = [i.down.weight for i in infos] + [i.up.weight for i in infos]
    for p in params:
        p.requires_grad_(True)

    def grads():
        total = [torch.zeros_like(p) for p in params]
        for b in encs:
            for t, gr in zip(total, torch.autograd.grad(model(**b).loss, params)):
                t += gr
        return total

    g0 = grads()
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, g0):
            p.add_(eps * d)
    gp = grads()
    with torch.no_grad():
        for p, d in zip(params, g0):
            p.sub_(2 * eps * d)
    gm = grads()
    with torch.no_grad():
        for p, d in zip(params, g0):
            p.add_(eps * d)
    want = [p.detach() * (a - b) / (2 * eps) for p, a, b in zip(params, gp, gm)]
    res = compute_scores("grasp", [i.down.weight.detach() for i in infos], [i.up.weight.detach() for i in infos], 0.5,
                         model=model, downs=[i.down for i in infos], ups=[i.up for i in infos], data=encs,
                         data_batches=2)
    got = res.SA + res.SB
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale)
    # and a ranking that differs from magnitude's (GraSP is not |W| in disguise)
    mag = torch.cat([i.down.weight.detach().abs().flatten() for i in infos])
    gra = torch.cat([t.flatten() for t in got[: len(infos)]])
    assert not torch.equal(torch.argsort(mag), torch.argsort(gra))


# ---------------------------------------------------------------------------------------
# SynFlow: SparseAdapter's recipe (absolute values, all-ones input, one round)
# ---------------------------------------------------------------------------------------
def _synflow_literal(model, through_input_norm: bool):
    """The recipe spelled out on the AdapterHub modules: every parameter replaced by its absolute
    value, an all-ones vector fed to each adapter (through its adapter_down Sequential, which
    holds the input LayerNorm when there is one, or straight to its down Linear), the outputs
    times the adapter's scaling summed, and |θ ⊙ ∂R/∂θ| by autograd."""
    import copy

    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in m.parameters():
            p.abs_()
    infos = find_adapters(m)
    params = [i.down.weight for i in infos] + [i.up.weight for i in infos]
    for p in params:
        p.requires_grad_(True)
    R = 0
    for i in infos:
        x = torch.ones(1, 1, i.d_in, dtype=torch.float64)  # one position (SparseAdapter: seq_len of them, a constant factor)
        h = i.module.adapter_down(x) if through_input_norm else i.module.non_linearity(i.down(x))
        R = R + (i.module.adapter_up(h) * i.module.scaling).sum()
    gs = torch.autograd.grad(R, params)
    S = [(g * p.detach()).abs() for g, p in zip(gs, params)]
    return S[: len(infos)], S[len(infos):]


def _synflow(model):
    infos = find_adapters(model)
    from tropfast.pruning.apply import adapter_scale

    return compute_scores("synflow", [i.down.weight.detach().double() for i in infos],
                          [i.up.weight.detach().double() for i in infos], 0.5, downs=[i.down for i in infos],
                          ups=[i.up for i in infos], scales=[adapter_scale(i) for i in infos])


def test_synflow_matches_the_recipe():
    model = tiny_model(scaling=0.5)
    with torch.no_grad():  # nonzero down-projection biases, so h_i = ‖A_i‖₁ + |a_i| is checked
        for i in find_adapters(model):
            i.down.bias.normal_(0, 1.0)
    eA, eB = _synflow_literal(model, through_input_norm=True)  # no input LayerNorm: the same
    res = _synflow(model)
    for got, want in zip(res.SA + res.SB, eA + eB):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert min(float(t.min()) for t in eA) > 0  # nothing degenerate here
    # the closed form of the docstring, for one adapter by hand
    i = find_adapters(model)[0]
    A, B, a = i.down.weight.double().abs(), i.up.weight.double().abs(), i.down.bias.double().abs()
    torch.testing.assert_close(res.SA[0], A * 0.5 * B.sum(0)[:, None])
    torch.testing.assert_close(res.SB[0], 0.5 * B * (A.sum(1) + a)[None, :])


def test_synflow_input_layernorm_would_be_degenerate():
    """With an input LayerNorm (ln_before=True) the ones become its bias, zero at initialisation,
    and every score of the literal recipe is zero; tropfast feeds the down-projection instead."""
    model = tiny_model(ln_before=True)
    assert all(isinstance(i.module.adapter_down[0], torch.nn.LayerNorm) for i in find_adapters(model))
    eA, eB = _synflow_literal(model, through_input_norm=True)
    assert all(float(t.abs().max()) == 0 for t in eA + eB)
    fA, fB = _synflow_literal(model, through_input_norm=False)
    res = _synflow(model)
    for got, want in zip(res.SA + res.SB, fA + fB):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert min(float(t.min()) for t in res.SA) > 0
    rep = prune(model, 0.25, "synflow", allocation="global", inplace=False)
    assert rep.kept == 512  # round(0.25 · 2048)


def test_partner_norm_hand_computed():
    """S_A = |A_ik|·β_i and S_B = |B_ji|·a_i with a_i = ‖A_i‖², β_i = ‖B_:i‖², on literal numbers."""
    A = torch.tensor([[1.0, -2.0], [3.0, 0.0]], dtype=torch.float64)  # a = (5, 9)
    B = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)  # β = (5, 10)
    res = compute_scores("partner_norm", [A], [B], 0.5)
    assert res.SA[0].tolist() == [[5.0, 10.0], [30.0, 0.0]]
    assert res.SB[0].tolist() == [[10.0, 0.0], [5.0, 9.0], [0.0, 27.0]]
    assert res.MA[0].tolist() == [[1.0, 2.0], [3.0, 0.0]]  # the tie-break stays |W|


# ---------------------------------------------------------------------------------------
# SynFlow's closed form on literal numbers: defaults, per-output scalings, dtypes
# ---------------------------------------------------------------------------------------
_A = [[1.0, -2.0], [3.0, 0.0]]  # |A| row sums h = (3, 3)
_B = [[2.0, 0.0], [-1.0, 1.0], [0.0, 3.0]]  # |B| column sums (3, 4)


def _ab(dtype=torch.float64):
    return [torch.tensor(_A, dtype=dtype)], [torch.tensor(_B, dtype=dtype)]


def test_synflow_without_biases_or_scales_hand_computed():
    from tropfast.pruning.scores import synflow_scores

    As, Bs = _ab()
    SA, SB = synflow_scores(As, Bs)
    assert SA[0].tolist() == [[3.0, 6.0], [12.0, 0.0]]
    assert SB[0].tolist() == [[6.0, 0.0], [3.0, 3.0], [0.0, 9.0]]


def test_synflow_per_output_and_scalar_scales_hand_computed():
    """A (d_out,) scaling weighs B's rows by |w_j|; a number or 0-d tensor weighs everything;
    the sign of a scaling does not count (the recipe takes absolute values)."""
    from tropfast.pruning.scores import synflow_scores

    As, Bs = _ab()
    SA, SB = synflow_scores(As, Bs, scales=[torch.tensor([1.0, -2.0, 0.5])])
    # w|B| = [[2, 0], [2, 2], [0, 1.5]]: column sums (4, 3.5)
    assert SA[0].tolist() == [[4.0, 8.0], [10.5, 0.0]] and SA[0].dtype == torch.float64
    assert SB[0].tolist() == [[6.0, 0.0], [6.0, 6.0], [0.0, 4.5]]
    for w in (-0.1, torch.tensor(-0.1, dtype=torch.float64)):
        SA, SB = synflow_scores(As, Bs, scales=[w])
        wB = 0.1 * Bs[0].abs()  # 0.1 in float64: a float32 scaling would round it
        assert torch.equal(SA[0], As[0].abs() * wB.sum(0)[:, None])
        assert torch.equal(SB[0], wB * torch.tensor([3.0, 3.0], dtype=torch.float64)[None, :])


def test_synflow_scores_keep_the_weights_dtype():
    """Scalings and biases of another dtype are cast to the weights' dtype, not the reverse."""
    from tropfast.pruning.scores import synflow_scores

    As, Bs = _ab(torch.float32)
    SA, SB = synflow_scores(As, Bs, biases=[torch.tensor([1.0, -1.0], dtype=torch.float64)],
                            scales=[torch.tensor([1.0, 0.1, 1.0], dtype=torch.float64)])
    assert SA[0].dtype == SB[0].dtype == torch.float32
    h = torch.tensor([4.0, 4.0])  # |A| row sums plus |bias|
    wB = torch.tensor(_B).abs() * torch.tensor([1.0, 0.1, 1.0], dtype=torch.float64).to(torch.float32)[:, None]
    assert torch.equal(SB[0], wB * h[None, :])
    assert torch.equal(SA[0], torch.tensor(_A).abs() * wB.sum(0)[:, None])


# ---------------------------------------------------------------------------------------
# default_loss: tensors, objects with .loss, and the refusals in full
# ---------------------------------------------------------------------------------------
class _TensorModel(torch.nn.Module):
    def __init__(self, result):
        super().__init__()
        self.result = result
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return self.result(x)


def test_default_loss_of_a_tensor_batch_and_of_an_output_object():
    import types

    from tropfast.pruning.scores import default_loss

    x = torch.tensor([1.0, 2.0])
    m = _TensorModel(lambda x: x.sum())
    assert default_loss(m, x) == 3.0 and m.seen[0] is x
    obj = _TensorModel(lambda x: types.SimpleNamespace(loss=x.prod(), logits=x))
    assert default_loss(obj, x) == 2.0
    mapping = _TensorModel(lambda x: {"loss": x.max()})
    assert default_loss(mapping, x) == 2.0
    none = _TensorModel(lambda x: types.SimpleNamespace(logits=x))
    with pytest.raises(ValueError) as e:
        default_loss(none, x)
    assert str(e.value) == (
        "the model output has no .loss (does the batch hold labels?): pass loss_fn=lambda model, batch: loss"
    )


def test_default_loss_refuses_a_batch_it_cannot_pass_in_full():
    from tropfast.pruning.scores import default_loss

    class Indexable:  # __getitem__ but no keys(): not a batch of named fields
        def __getitem__(self, k):
            return k

    for batch in (Indexable(), 3.5):
        with pytest.raises(TypeError) as e:
            default_loss(_TensorModel(lambda x: x), batch)
        assert str(e.value) == (
            f"data yielded a batch of type {type(batch).__name__}; a batch must be a mapping (dict, BatchEncoding), "
            "a dataclass, a tuple/list of positional arguments or a tensor; or pass loss_fn=lambda model, batch: loss"
        )


# ---------------------------------------------------------------------------------------
# the tropical score's solver diagnostics are the solve's own numbers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ista", "bcd"])
@pytest.mark.parametrize("lam_gen", [0.0, 0.5])
def test_tropical_diagnostics_are_those_of_the_solve(method, lam_gen):
    import tropfast
    from tropfast.pruning.scores import generator_lambdas, tropical_lambdas

    g = torch.Generator().manual_seed(3)
    As = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    Bs = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    opts = {"method": method, "steps": 7, "lam": 0.3, "dtype": "float64", "search_iters": 3, "lam_gen": lam_gen}
    res = compute_scores("tropical", As, Bs, 0.4, tropical=opts)
    l1, l2 = tropical_lambdas(As, Bs, 0.3)
    lg = generator_lambdas(As, Bs, 0.3, lam_gen) if lam_gen else 0.0
    sol = tropfast.solve(As, Bs, lam1=l1, lam2=l2, method=method, steps=7, target_keep=0.4, search_iters=3,
                         search_tol=res.solver["options"]["search_tol"], lam_gen=lg, record_every=0)
    want = {
        "method": method,
        "backend": sol.backend,
        "steps": sol.steps.tolist(),
        "lam1": sol.lam1.tolist(),
        "lam2": sol.lam2.tolist(),
        "lr": None if method == "bcd" else sol.lr.tolist(),
        "objective_start": sol.objective[:, 0].tolist(),
        "objective_end": sol.objective[:, -1].tolist(),
        "lam_gen": None if sol.lam_gen is None else sol.lam_gen.tolist(),
        "solver_kept_fraction": sol.kept_fraction.tolist(),
        "search_iters": len(sol.search),
    }
    got = {k: v for k, v in res.solver.items() if k not in ("options", "target_keep", "cached")}
    assert got == want
    assert len(sol.search) == 3 and sol.objective.shape[1] == 2 and (lam_gen == 0) == (sol.lam_gen is None)
    assert res.solver["target_keep"] == 0.4 and res.solver["cached"] is False
