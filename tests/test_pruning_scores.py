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


# ---------------------------------------------------------------------------------------
# the data scores on plain modules: batches taken, fp64 sums, adapters the forward skips
# ---------------------------------------------------------------------------------------
class TwoNet(torch.nn.Module):
    """Two adapters; the loss uses only the first (as an adapter that is not active).  A batch
    whose third field is 0 gives a loss linear in the first adapter's up-projection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 6))
        self.b = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 6))

    def forward(self, x, y, quadratic=1):
        if not quadratic:
            return (self.a[2].weight * 0.5).sum()
        return ((x + self.a(x) - y) ** 2).mean()


def _two_data(n, quadratic=(1, 1, 1)):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), quadratic[k]) for k in range(n)]


def _scores(score, net, mods, data, batches, dtype=torch.float64):
    downs, ups = [m[0] for m in mods], [m[2] for m in mods]
    return compute_scores(score, [d.weight.detach().to(dtype) for d in downs], [u.weight.detach().to(dtype) for u in ups],
                          0.5, model=net, downs=downs, ups=ups, data=data, data_batches=batches)


def test_snip_takes_the_first_batches_and_sums_in_the_scores_dtype():
    """data_batches=2 of three batches: the first two, their fp32 gradients summed in fp64."""
    net = TwoNet()
    data = _two_data(3)
    params = [net.a[0].weight, net.a[2].weight]
    grads = [torch.autograd.grad(net(x, y), params) for x, y, _ in data[:2]]
    want = [(g1.double() + g2.double()) * p.detach().double() for g1, g2, p in zip(*grads, params)]
    res = _scores("snip", net, [net.a], iter(data), 2)
    assert res.SA[0].dtype == torch.float64
    assert torch.equal(res.SA[0], want[0].abs()) and torch.equal(res.SB[0], want[1].abs())
    assert res.extra["data_batches"] == 2


@pytest.mark.parametrize("score", ["snip", "grasp"])
def test_data_scores_of_an_adapter_the_loss_does_not_use_are_zero(score):
    net = TwoNet()
    res = _scores(score, net, [net.a, net.b], _two_data(2), 2)
    assert res.SA[0].any() and res.SB[0].any()
    assert not res.SA[1].any() and not res.SB[1].any()
    only_b = _scores(score, net, [net.b], _two_data(2), 2)  # no score has a gradient at all
    assert not only_b.SA[0].any() and not only_b.SB[0].any()


def test_grasp_skips_a_batch_whose_loss_is_linear_in_the_weights():
    """Batch 1's loss is linear in the weights (its Hessian is 0), batch 2's is not: H g is
    batch 2's Hessian times the gradient g of both batches."""
    net = TwoNet()
    data = _two_data(2, quadratic=(0, 1))
    params = [net.a[0].weight, net.a[2].weight]
    per_batch = [torch.autograd.grad(net(*b), params, allow_unused=True) for b in data]
    g = [sum(torch.zeros_like(p) if x is None else x for x in t) for p, t in zip(params, zip(*per_batch))]
    g2 = torch.autograd.grad(net(*data[1]), params, create_graph=True)
    hg = torch.autograd.grad(sum((x * y.detach()).sum() for x, y in zip(g2, g)), params)
    res = _scores("grasp", net, [net.a], data, 2, dtype=torch.float32)
    assert res.SA[0].any()
    torch.testing.assert_close(res.SA[0], hg[0] * params[0].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.SB[0], hg[1] * params[1].detach(), rtol=1e-5, atol=1e-7)


def test_data_score_refusals_in_full():
    net = TwoNet()
    with pytest.raises(ValueError) as e:
        _scores("snip", net, [net.a], [], 2)
    assert str(e.value) == "score='snip': data yielded no batch"
    with pytest.raises(ValueError) as e:
        _scores("grasp", net, [net.a], None, 2)
    assert str(e.value) == (
        "score='grasp' needs data: pass data=<an iterable of batches> (alias snip_data) and, unless "
        "model(**batch).loss is the loss, loss_fn=lambda model, batch: loss"
    )
    for bad in (lambda m, b: torch.ones(2, requires_grad=True), lambda m, b: 1.0):
        downs, ups = [net.a[0]], [net.a[2]]
        with pytest.raises(ValueError) as e:
            compute_scores("snip", [downs[0].weight.detach()], [ups[0].weight.detach()], 0.5, model=net, downs=downs,
                           ups=ups, data=_two_data(1), loss_fn=bad, data_batches=1)
        assert str(e.value) == "loss_fn must return a scalar tensor"


def test_a_single_dataclass_batch_is_one_batch():
    @dataclasses.dataclass
    class XY:
        x: object
        y: object

    net = TwoNet()
    (x, y, _), = _two_data(1)
    one = _scores("snip", net, [net.a], [XY(x, y)], 1)
    res = compute_scores("snip", [net.a[0].weight.detach().double()], [net.a[2].weight.detach().double()], 0.5,
                         model=net, downs=[net.a[0]], ups=[net.a[2]], data=XY(x, y), data_batches=4)
    assert torch.equal(res.SA[0], one.SA[0]) and torch.equal(res.SB[0], one.SB[0])


# ---------------------------------------------------------------------------------------
# the tropical score: λ, options, output dtype, the solve cache
# ---------------------------------------------------------------------------------------
def test_tropical_lambdas_hand_computed():
    from tropfast.pruning.scores import tropical_lambdas

    As, Bs = _ab()  # mean β = 7.5, mean|A| = 1.5; mean a = 7, mean|B| = 7/6
    l1, l2 = tropical_lambdas(As, Bs, 0.5)
    # (from the sums ‖B‖², ‖A‖₁, ... of the whole matrices: exact to a few ulps)
    assert l1.tolist() == [pytest.approx(0.5 * 7.5 * 1.5, rel=1e-14)] and l2.tolist() == [pytest.approx(0.5 * 7 * 7 / 6, rel=1e-14)]
    l1r, l2r = tropical_lambdas(As, Bs, 0.5, ratio=2.0)
    assert torch.equal(l1r, l1) and torch.equal(l2r, 2 * l2)


@pytest.fixture
def fresh_cache(monkeypatch):
    import collections as _c

    from tropfast.pruning import scores

    monkeypatch.setattr(scores, "_SOLVE_CACHE", _c.OrderedDict())
    return scores


def _weights(seed=3, shapes=((4, 6, 5), (3, 6, 5)), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, d_in, generator=g, dtype=dtype) for r, d_in, _ in shapes]
    Bs = [torch.randn(d_out, r, generator=g, dtype=dtype) for r, _, d_out in shapes]
    return As, Bs


def test_tropical_options_reach_the_solve(fresh_cache):
    import tropfast
    from tropfast.pruning.scores import check_tropical_options, tropical_lambdas

    As, Bs = _weights()
    opts = {"method": "fista", "steps": 6, "lam": 0.4, "lam_ratio": 2.0, "lr": 0.01, "backend": "torch",
            "search_tol": 0.65, "search_iters": 3, "dtype": "float64"}
    res = compute_scores("tropical", As, Bs, 0.3, tropical=opts)
    l1, l2 = tropical_lambdas(As, Bs, 0.4, 2.0)
    sol = tropfast.solve(As, Bs, lam1=l1, lam2=l2, method="fista", steps=6, lr=0.01, target_keep=0.3,
                         backend="torch", search_iters=3, search_tol=0.65, record_every=0)
    d = res.solver
    assert d["method"] == "fista" and d["backend"] == "torch" and d["lr"] == [0.01, 0.01]
    assert d["lam1"] == sol.lam1.tolist() and d["lam2"] == sol.lam2.tolist()
    assert d["search_iters"] == len(sol.search) == 1  # a loose tolerance: the first probe is close enough
    assert d["options"] == check_tropical_options(opts) and d["target_keep"] == 0.3 and d["cached"] is False
    assert all(torch.equal(a, b) for a, b in zip(res.A_hat + res.B_hat, sol.A_hat + sol.B_hat))


def test_tropical_scores_come_back_in_the_weights_dtype(fresh_cache):
    As, Bs = _weights()
    res = compute_scores("tropical", As, Bs, 0.3, tropical={"steps": 5, "search_iters": 2})  # solved in fp32
    assert {t.dtype for t in res.A_hat + res.B_hat + res.SA + res.SB} == {torch.float64}
    again = compute_scores("tropical", [a.float() for a in As], [b.float() for b in Bs], 0.3,
                           tropical={"steps": 5, "search_iters": 2})  # the same fp32 solve: from the cache
    assert again.solver["cached"] is True
    assert {t.dtype for t in again.A_hat + again.B_hat} == {torch.float32}
    assert all(torch.equal(a, b.float()) for a, b in zip(again.A_hat, res.A_hat))


def test_tropical_solve_cache_keys_and_eviction(fresh_cache):
    scores = fresh_cache
    As, Bs = _weights()
    o = {"steps": 4, "search_iters": 2, "dtype": "float64"}

    def run(keep=0.3, As=As, Bs=Bs, **kw):
        return compute_scores("tropical", As, Bs, keep, tropical={**o, **kw})

    first = run()
    again = run()
    assert first.solver["cached"] is False and again.solver["cached"] is True
    assert {k: v for k, v in again.solver.items() if k != "cached"} == {k: v for k, v in first.solver.items() if k != "cached"}
    assert all(torch.equal(a, b) for a, b in zip(again.SA + again.SB, first.SA + first.SB))
    assert run(keep=0.5).solver["cached"] is False  # another target
    assert run(steps=5).solver["cached"] is False  # another option value
    # the same bytes in other shapes: (2, 3) and (3, 2) weights of one adapter
    flat = torch.arange(1.0, 13.0, dtype=torch.float64)
    a1, b1 = flat[:6].view(2, 3), flat[6:].view(3, 2)
    a2, b2 = flat[:6].view(3, 2), flat[6:].view(2, 3)
    run(As=[a1], Bs=[b1])
    r2 = run(As=[a2], Bs=[b2])
    assert r2.solver["cached"] is False and r2.SA[0].shape == (3, 2) and r2.SB[0].shape == (2, 3)
    # eight solves are kept, the least recently used goes first
    scores._SOLVE_CACHE.clear()
    keeps = [0.1 + 0.05 * k for k in range(9)]
    for k in keeps:
        run(keep=k)
    assert len(scores._SOLVE_CACHE) == 8
    assert run(keep=keeps[1]).solver["cached"] is True
    assert run(keep=keeps[0]).solver["cached"] is False


def test_tropical_with_an_adapter_without_units(fresh_cache):
    """An adapter whose units were all removed is not solved; the others are, with the options
    and the keep share given."""
    As, Bs = _weights()
    As.insert(1, torch.zeros(0, 6, dtype=torch.float64))
    Bs.insert(1, torch.zeros(5, 0, dtype=torch.float64))
    res = compute_scores("tropical", As, Bs, 0.3, tropical={"method": "bcd", "steps": 4, "search_iters": 2})
    d = res.solver
    assert d["adapters_solved"] == [0, 2] and d["method"] == "bcd" and d["target_keep"] == 0.3
    assert len(d["steps"]) == 2 and res.SA[1].shape == (0, 6) and res.SB[1].shape == (5, 0)


def test_tropical_refuses_non_finite_solutions_in_full(fresh_cache, monkeypatch):
    scores = fresh_cache
    real = scores.solve

    def broken(*a, **k):
        sol = real(*a, **k)
        sol.B_hat[1][0, 0] = float("nan")  # Â is finite: only B̂ tells
        return sol

    monkeypatch.setattr(scores, "solve", broken)
    As, Bs = _weights()
    with pytest.raises(FloatingPointError) as e:
        compute_scores("tropical", As, Bs, 0.3, tropical={"steps": 3, "search_iters": 1})
    assert str(e.value) == "the tropical solver returned non-finite values for adapter #1"
    assert len(scores._SOLVE_CACHE) == 0


def test_tropical_progress_shows_the_search(fresh_cache, capsys):
    As, Bs = _weights()
    compute_scores("tropical", As, Bs, 0.3, tropical={"steps": 3, "search_iters": 2}, progress=True)
    assert "tropfast lambda search" in capsys.readouterr().err
    compute_scores("tropical", As, Bs, 0.4, tropical={"steps": 3, "search_iters": 2})
    assert "tropfast lambda search" not in capsys.readouterr().err
    As.append(torch.zeros(0, 6, dtype=torch.float64))  # an adapter without units: the others still show it
    Bs.append(torch.zeros(5, 0, dtype=torch.float64))
    compute_scores("tropical", As, Bs, 0.5, tropical={"steps": 3, "search_iters": 2}, progress=True)
    assert "tropfast lambda search" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# adapter_gradient_ranks on a plain model: G_k = Σ δ xᵀ against autograd, tokens, refusals
# ---------------------------------------------------------------------------------------
class _Residual(torch.nn.Module):
    """A bottleneck whose forward returns a tuple, a list or the tensor (as adapter modules do)."""

    def __init__(self, d, r, out="tensor"):
        super().__init__()
        self.down, self.up, self.out = torch.nn.Linear(d, r), torch.nn.Linear(r, d), out

    def forward(self, x):
        y = self.up(torch.relu(self.down(x)))
        return (y, 0.0) if self.out == "tuple" else [y, 0.0] if self.out == "list" else y


class GRNet(torch.nn.Module):
    """Two adapters in a row; the loss sums squared errors over every token."""

    def __init__(self, outs=("tuple", "list")):
        super().__init__()
        torch.manual_seed(1)
        self.a = _Residual(6, 3, outs[0])
        self.b = _Residual(6, 2, outs[1])

    def forward(self, x, labels, attention_mask=None):  # padding counts in the loss: only the ranks skip it
        a = self.a(x)
        h = x + a[0] + a[1]  # the hooks pass the other outputs on
        b = self.b(h)
        h = h + b[0] + b[1]
        return ((h - labels) ** 2).sum()


def _gr_batches(n=2, masked=True):
    g = torch.Generator().manual_seed(2)
    out = []
    for k in range(n):
        b = {"x": torch.randn(2, 5, 6, generator=g), "labels": torch.randn(2, 5, 6, generator=g)}
        if masked:
            b["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, k]])
        out.append(b)
    return out


def _gr_reference(net, batches, rtol):
    """∂L/∂W for a zero map W added to each adapter's output, by autograd (no tropfast code)."""
    mods = [net.a, net.b]
    Ws = [torch.zeros(6, 6, dtype=torch.float64, requires_grad=True) for _ in mods]
    Gs = [torch.zeros(6, 6, dtype=torch.float64) for _ in mods]

    def hook_for(W, m):
        def hook(mod, args, out):  # W sees the unmasked tokens only
            extra = ((args[0] * m[..., None]).double() @ W.T).float()
            return (out[0] + extra,) + tuple(out[1:]) if isinstance(out, tuple) else [out[0] + extra] + out[1:]

        return hook

    for b in batches:
        m = b.get("attention_mask", torch.ones(b["x"].shape[:2]))
        hs = [mod.register_forward_hook(hook_for(W, m)) for mod, W in zip(mods, Ws)]
        try:
            for G, g in zip(Gs, torch.autograd.grad(net(**b), Ws)):
                G += g
        finally:
            for h in hs:
                h.remove()
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else 10 for b in batches)
    ranks = [int(torch.linalg.matrix_rank(G, rtol=rtol)) for G in Gs]
    return ranks, [min(6, 6, tokens)] * 2, [float(torch.linalg.matrix_norm(G)) for G in Gs], tokens


@pytest.mark.parametrize("masked", [True, False])
def test_adapter_gradient_ranks_against_autograd(masked):
    from tropfast.pruning.scores import adapter_gradient_ranks

    net = GRNet()
    batches = _gr_batches(3, masked)
    net.train()
    net.a.down.weight.requires_grad_(False)
    threads = torch.get_num_threads()
    got = adapter_gradient_ranks(net, [net.a, net.b], batches, batches=2, rtol=0.05)
    ranks, max_ranks, fros, tokens = _gr_reference(net, batches[:2], 0.05)
    assert got["rank"] == ranks and got["max_rank"] == max_ranks and got["tokens"] == tokens
    assert got["fro"] == pytest.approx(fros, rel=1e-5) and min(got["fro"]) > 0
    assert tokens == (15 if masked else 20)  # (3 + 4) + (3 + 5) unmasked tokens
    assert net.training and net.a.down.weight.requires_grad is False and net.b.up.weight.requires_grad is True
    assert torch.get_num_threads() == threads
    assert all(p.grad is None for p in net.parameters())
    tight = adapter_gradient_ranks(net, [net.a, net.b], batches, batches=2, rtol=0.0)
    assert all(t >= r for t, r in zip(tight["rank"], ranks)) and tight["rank"] != ranks, (tight["rank"], ranks)


def test_adapter_gradient_ranks_refusals_in_full():
    from tropfast.pruning.scores import adapter_gradient_ranks

    net = GRNet()
    mods = [net.a, net.b]
    batches = _gr_batches(1)
    cases = [
        (dict(data=None), ValueError, "allocation='gradient_rank' needs data: pass data=<an iterable of batches> "
         "(and loss_fn if model(**batch).loss is not the loss)"),
        (dict(batches=0), ValueError, "gradient_rank batches must be a positive integer, got 0"),
        (dict(batches=True), ValueError, "gradient_rank batches must be a positive integer, got True"),
        (dict(rtol=1.0), ValueError, "gradient_rank rtol must lie in [0, 1), got 1.0"),
        (dict(rtol=-0.1), ValueError, "gradient_rank rtol must lie in [0, 1), got -0.1"),
        (dict(rtol="0.1"), ValueError, "gradient_rank rtol must lie in [0, 1), got '0.1'"),
        (dict(data=[]), ValueError, "data yielded no batch"),
        (dict(loss_fn=lambda m, b: torch.ones(2)), ValueError, "loss_fn must return a scalar tensor"),
        (dict(loss_fn=lambda m, b: m(**b) * float("nan")), FloatingPointError, "the loss of batch 0 is nan"),
        (dict(loss_fn=lambda m, b: torch.ones((), requires_grad=True)), RuntimeError, "the forward pass ran none of the adapters"),
    ]
    for kw, exc, message in cases:
        args = dict(data=batches, batches=4, rtol=1e-2, loss_fn=None) | kw
        data = args.pop("data")
        with pytest.raises(exc) as e:
            adapter_gradient_ranks(net, mods, data, args.pop("loss_fn"), **args)
        assert str(e.value) == message
    idle = _Residual(6, 2)
    with pytest.raises(RuntimeError) as e:
        adapter_gradient_ranks(net, [net.a, idle], batches)
    assert str(e.value) == "adapter #1 (_Residual) never ran in the forward pass"


@pytest.mark.parametrize(
    "opts, exc, message",
    [
        ([1], TypeError, "tropical must be a dict of solver options, got list"),
        ({"steps": 3, "nope": 1, "also": 2}, ValueError, None),
        ({"method": "newton"}, ValueError, "tropical option method must be 'ista', 'fista' or 'bcd', got 'newton'"),
        ({"lam": 0.0}, ValueError, "tropical option lam must be a finite number > 0, got 0.0"),
        ({"lam": float("nan")}, ValueError, "tropical option lam must be a finite number > 0, got nan"),
        ({"lam_ratio": "1"}, ValueError, "tropical option lam_ratio must be a finite number > 0, got '1'"),
        ({"lam_gen": -0.5}, ValueError, "tropical option lam_gen must be a finite number >= 0, got -0.5"),
        ({"lam_gen": float("inf")}, ValueError, "tropical option lam_gen must be a finite number >= 0, got inf"),
        ({"lam_gen": None}, ValueError, "tropical option lam_gen must be a finite number >= 0, got None"),
        ({"steps": 0}, ValueError, "tropical option steps must be an integer >= 1 below 2**63, got 0"),
        ({"steps": True}, ValueError, "tropical option steps must be an integer >= 1 below 2**63, got True"),
        ({"steps": 2**63}, ValueError, f"tropical option steps must be an integer >= 1 below 2**63, got {2**63}"),
        ({"search_iters": 0}, ValueError, "tropical option search_iters must be an integer >= 1 below 2**63, got 0"),
        ({"target": 1}, ValueError, "tropical option target must be True or False, got 1"),
        ({"lr": 0.0}, ValueError, "tropical option lr must be None or a finite number > 0, got 0.0"),
        ({"lr": "0.1"}, ValueError, "tropical option lr must be None or a finite number > 0, got '0.1'"),
        ({"lr": 0.1, "method": "bcd"}, ValueError, "tropical option lr must be None for method 'bcd' (it takes no step size), got 0.1"),
        ({"search_tol": 1.0}, ValueError, "tropical option search_tol must be in [0, 1), got 1.0"),
        ({"backend": 3}, ValueError, "tropical option backend must be None or a backend name, got 3"),
        ({"dtype": "float16"}, ValueError, "tropical option dtype must be 'float32' or 'float64', got 'float16'"),
    ],
)
def test_tropical_option_refusals_in_full(opts, exc, message):
    from tropfast.pruning.scores import TROPICAL_DEFAULTS, check_tropical_options

    with pytest.raises(exc) as e:
        check_tropical_options(opts)
    if message is None:
        message = f"unknown tropical option(s) ['also', 'nope']; known: {sorted(TROPICAL_DEFAULTS)}"
    assert str(e.value) == message


def test_tropical_options_at_their_edges():
    import numpy as np

    from tropfast.pruning.scores import TROPICAL_DEFAULTS, check_tropical_options

    assert check_tropical_options(None) == TROPICAL_DEFAULTS and check_tropical_options({}) == TROPICAL_DEFAULTS
    o = check_tropical_options({"steps": 1, "search_iters": 1, "lam_gen": 0, "lam": np.float32(0.25), "lr": 1e-3,
                                "search_tol": 0.0, "method": "fista", "backend": "torch", "dtype": "float64"})
    assert (o["steps"], o["search_iters"], o["lam_gen"], o["lam"], o["lr"], o["method"]) == (1, 1, 0.0, 0.25, 1e-3, "fista")
    assert check_tropical_options({"target": False, "search_iters": 0})["search_iters"] == 0
    assert check_tropical_options({"steps": 2**63 - 1})["steps"] == 2**63 - 1
    assert type(check_tropical_options({"steps": np.int64(5)})["steps"]) is int
    assert type(check_tropical_options({"lr": np.float32(0.5)})["lr"]) is float


class _Proj(torch.nn.Module):
    """A 6 -> 4 map (not residual): G is 4 x 6."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x)


class GRNet2(torch.nn.Module):
    """A tensor-output adapter, a 6 -> 4 projection, and an adapter whose output is discarded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.p, self.c = _Residual(6, 3, "tensor"), _Proj(), _Residual(6, 2, "tensor")

    def forward(self, x, labels):
        h = x + self.a(x)
        self.c(h)  # runs, but the loss does not use it
        return ((h - labels) ** 2).sum() + self.p(h).pow(2).sum()


def test_adapter_gradient_ranks_shapes_defaults_and_unused_adapters():
    from tropfast.pruning.scores import adapter_gradient_ranks

    net = GRNet2()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(2, 2, 6, generator=g), torch.randn(2, 2, 6, generator=g)) for _ in range(5)]
    loss_fn = lambda m, b: m(*b)  # noqa: E731  (positional batches: no attention mask)
    got = adapter_gradient_ranks(net, [net.a, net.p, net.c], batches, loss_fn)  # 4 batches by default
    assert got["tokens"] == 16
    assert got["max_rank"] == [6, 4, 6] and got["rank"][2] == 0 and got["fro"][2] == 0.0
    assert 0 < got["rank"][1] <= 4 and 0 < got["rank"][0] <= 6
    one = adapter_gradient_ranks(net, [net.a, net.p], batches, loss_fn, batches=1)
    assert one["tokens"] == 4 and one["max_rank"] == [4, 4] and max(one["rank"]) <= 4


def test_adapter_gradient_ranks_refuses_adapters_it_cannot_read_in_full():
    from tropfast.pruning.scores import adapter_gradient_ranks

    class KwCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _Residual(6, 3, "tensor")

        def forward(self, x, labels):
            return ((x + self.a(x=x) - labels) ** 2).sum()  # the hook sees no positional input

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _Residual(6, 3, "tensor")
            self.a.forward = lambda x: _Residual.forward(self.a, x)[:, :-1]  # one token fewer out than in

        def forward(self, x, labels):
            return ((x[:, :-1] + self.a(x) - labels[:, :-1]) ** 2).sum()

    x, y = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    for net, exc, message in (
        (KwCall(), TypeError, "adapter #0 (_Residual): expected a tensor input and output"),
        (Pool(), ValueError, "adapter #0: its input and output hold different numbers of tokens"),
    ):
        with pytest.raises(exc) as e:
            adapter_gradient_ranks(net, [net.a], [(x, y)], lambda m, b: m(*b))
        assert str(e.value) == message


def test_score_aliases_and_defaults_in_full():
    from tropfast.pruning.scores import all_finite

    As, Bs = _ab()
    for new, old in (("data", "snip_data"), ("loss_fn", "snip_loss_fn"), ("data_batches", "snip_batches")):
        with pytest.raises(ValueError) as e:
            compute_scores("magnitude", As, Bs, 0.5, **{new: [1] if "batches" not in new else 1,
                                                          old: [2] if "batches" not in new else 2})
        assert str(e.value) == f"{new}= and its alias {old}= were both given; pass one"
    same = [1]
    assert compute_scores("magnitude", As, Bs, 0.5, data=same, snip_data=same).name == "magnitude"
    calls = []
    net = TwoNet()
    compute_scores("snip", [net.a[0].weight.detach()], [net.a[2].weight.detach()], 0.5, model=net, downs=[net.a[0]],
                   ups=[net.a[2]], data=_two_data(1), snip_loss_fn=lambda m, b: calls.append(1) or m(*b[:2]),
                   data_batches=1)
    assert calls == [1]  # the old name still reaches the loss
    r = compute_scores("random", As, Bs, 0.5)  # seed 0 by default
    g = torch.Generator().manual_seed(0)
    assert torch.equal(r.SA[0], torch.rand((2, 2), generator=g, dtype=torch.float64))
    big = torch.tensor([1e308, 1e308], dtype=torch.float64)  # finite entries whose sum overflows
    assert all_finite([big, torch.tensor([1.0, float("nan")])]) == [True, False] and all_finite([]) == []


def test_score_names_refusals_and_checks_of_compute_scores_in_full():
    from tropfast.pruning.scores import SCORES, canonical_score

    assert [canonical_score(n) for n in ("Partner Norm", "partner-norm", "standard", "SynFlow", "magnitude")] == [
        "partner_norm", "partner_norm", "magnitude", "synflow", "magnitude"]
    with pytest.raises(ValueError) as e:
        canonical_score("snap")
    assert str(e.value) == f"score='snap' is not a score; choose one of {', '.join(SCORES)}"
    with pytest.raises(TypeError) as e:
        canonical_score(3)
    assert str(e.value) == f"score must be a string, one of {', '.join(SCORES)}; got 3"
    As, Bs = _ab()
    net = TwoNet()
    for kw in (dict(model=None, downs=[net.a[0]], ups=[net.a[2]]), dict(model=net, downs=None, ups=[net.a[2]]),
               dict(model=net, downs=[net.a[0]], ups=None)):
        with pytest.raises(ValueError) as e:
            compute_scores("snip", As, Bs, 0.5, data=_two_data(1), **kw)
        assert str(e.value) == "score='snip' needs the model"
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError) as e:
            compute_scores("grasp", As, Bs, 0.5, data=_two_data(1), data_batches=bad, model=net, downs=[net.a[0]],
                           ups=[net.a[2]])
        assert str(e.value) == f"data_batches must be a positive integer, got {bad!r}"
    assert compute_scores("magnitude", As, Bs, 0.5, data_batches=0).name == "magnitude"  # not a data score: unchecked
    snip = compute_scores("snip", [net.a[0].weight.detach()], [net.a[2].weight.detach()], 0.5, model=net,
                          downs=[net.a[0]], ups=[net.a[2]], data=_two_data(6, quadratic=(1,) * 6))
    assert snip.extra["data_batches"] == 4  # the default
    syn = compute_scores("synflow", As, Bs, 0.5)  # no modules: no biases
    assert syn.SA[0].tolist() == [[3.0, 6.0], [12.0, 0.0]]
    r = compute_scores("random", As, Bs, 0.5, seed=7)
    g = torch.Generator().manual_seed(7)
    want_a = torch.rand((2, 2), generator=g, dtype=torch.float64)
    want_b = torch.rand((3, 2), generator=g, dtype=torch.float64)
    assert torch.equal(r.SA[0], want_a) and torch.equal(r.SB[0], want_b) and r.SB[0].dtype == torch.float64


@pytest.mark.parametrize("score", ["partner_norm", "synflow"])
def test_scores_that_overflow_are_refused_per_adapter(score):
    As = [torch.ones(2, 2, dtype=torch.float32), torch.ones(2, 2, dtype=torch.float32)]
    Bs = [torch.ones(3, 2, dtype=torch.float32), torch.full((3, 2), 3e38, dtype=torch.float32)]  # B's score overflows
    with pytest.raises(FloatingPointError) as e:
        compute_scores(score, As, Bs, 0.5)
    assert str(e.value) == f"score {score!r} is not finite for adapter #1"
    assert compute_scores("magnitude", As, Bs, 0.5).SA[1].tolist() == [[1.0, 1.0], [1.0, 1.0]]
