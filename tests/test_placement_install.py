"""tropfast.placement.apply / save / load / remove: AdapterHub and hook adapters.

Hook adapters are checked against AdapterHub's own seq_bn / par_bn (same weights, same
outputs) and long-range ones against a hand-written forward; they train, prune, save and load.
"""
from __future__ import annotations

import copy
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("adapters")

import pruning_fixtures  # noqa: E402,F401
from placement_fixtures import batches, hook_objects, logits, model_with_head  # noqa: E402

import tropfast  # noqa: E402
from tropfast import placement as P  # noqa: E402
from tropfast.pruning import find_adapters  # noqa: E402


def _plan(*ids: str, r: int = 4) -> P.Placement:
    return P.Placement([P.parse_id(i, 32) for i in ids], r=r, n_layers=2, hidden=32)


def _randomise(params, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _hub_module(model, name: str, cid: str):
    c = P.parse_id(cid)
    lay = model.bert.encoder.layer[c.layer]
    where = lay.attention.output if c.location == "attn" else lay.output
    return where.adapters[f"{name}_{c.kind}_{c.location}"]


@pytest.mark.parametrize("ids", [("seq@L0.attn", "seq@L1.ffn"), ("par@L0.ffn", "par@L1.attn"), ("seq@L1.ffn",)])
def test_hook_adapters_compute_what_adapterhub_computes(ids):
    data = batches(n=1)
    hub_model = model_with_head()
    hook_model = model_with_head()
    hub = P.apply(hub_model, _plan(*ids), name="pl", head="h")
    hooks = P.apply(hook_model, _plan(*ids), name="pl", hub=False, head="h")
    assert set(hub.via.values()) == {"adapters"} and set(hooks.via.values()) == {"hooks"}
    assert len(hub.hub) == len({(P.parse_id(i).kind, P.parse_id(i).location) for i in ids}) and hooks.hub == []
    _randomise(hub.parameters())
    for cid, mod in hooks.modules.items():
        a = _hub_module(hub_model, "pl", cid)
        assert mod.scaling == a.scaling  # 1 for seq, 4 for par, as SeqBnConfig / ParBnConfig
        with torch.no_grad():
            mod.down.weight.copy_(a.adapter_down[0].weight)
            mod.down.bias.copy_(a.adapter_down[0].bias)
            mod.up.weight.copy_(a.adapter_up.weight)
            mod.up.bias.copy_(a.adapter_up.bias)
    plain = logits(model_with_head(), data)
    out_hub, out_hooks = logits(hub_model, data), logits(hook_model, data)
    assert (out_hub - plain).abs().max() > 1e-2  # the adapters change the outputs
    torch.testing.assert_close(out_hooks, out_hub, rtol=1e-5, atol=1e-5)


def test_long_range_adapter_matches_hand_written_forward():
    data = batches(n=1)
    m = model_with_head()
    inst = P.apply(m, _plan("long@emb->L1.ffn", "long@L0->L1.ffn"), name="lr")
    assert inst.via == {"long@emb->L1.ffn": "hooks", "long@L0->L1.ffn": "hooks"} and inst.hub == []
    _randomise(inst.parameters())
    got = logits(m, data)
    ref_model = model_with_head()
    mods = inst.modules
    f_emb, f_l0 = mods["long@emb->L1.ffn"], mods["long@L0->L1.ffn"]

    def f(mod, x):  # the adapter by hand: up(relu(down(x))) · scaling
        hidden = torch.relu(x @ mod.down.weight.T + mod.down.bias)
        return (hidden @ mod.up.weight.T + mod.up.bias) * mod.scaling

    seen = {}
    hs = [ref_model.bert.embeddings.register_forward_hook(lambda mm, a, o: seen.__setitem__("emb", o)),
          ref_model.bert.encoder.layer[0].register_forward_hook(lambda mm, a, o: seen.__setitem__("l0", o[0]))]
    out1 = ref_model.bert.encoder.layer[1].output

    def forward(self, hidden_states, input_tensor):
        h = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(h + input_tensor + f(f_emb, seen["emb"]) + f(f_l0, seen["l0"]))

    out1.forward = types.MethodType(forward, out1)
    try:
        want = logits(ref_model, data)
    finally:
        for h in hs:
            h.remove()
    assert (want - logits(model_with_head(), data)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_seq_and_par_at_one_sublayer():
    m = model_with_head()
    inst = P.apply(m, _plan("seq@L0.ffn", "par@L0.ffn", "par@L1.ffn"), name="mix")
    # AdapterHub cannot stack seq and par at one sublayer: the par one there runs as a hook
    assert inst.via == {"seq@L0.ffn": "adapters", "par@L0.ffn": "hooks", "par@L1.ffn": "adapters"}
    assert inst.hub == ["mix_seq_ffn", "mix_par_ffn"]
    ref = model_with_head()
    ref_inst = P.apply(ref, _plan("seq@L0.ffn", "par@L0.ffn", "par@L1.ffn"), name="mix", hub=False)
    _randomise(inst.parameters(), seed=1)
    src = {"seq@L0.ffn": _hub_module(m, "mix", "seq@L0.ffn"), "par@L1.ffn": _hub_module(m, "mix", "par@L1.ffn")}
    for cid, mod in ref_inst.modules.items():
        with torch.no_grad():
            if cid in src:
                a = src[cid]
                pairs = ((mod.down, a.adapter_down[0]), (mod.up, a.adapter_up))
            else:
                h = inst.modules[cid]
                pairs = ((mod.down, h.down), (mod.up, h.up))
            for dst, s in pairs:
                dst.weight.copy_(s.weight)
                dst.bias.copy_(s.bias)
    data = batches(n=1)
    torch.testing.assert_close(logits(m, data), logits(ref, data), rtol=1e-5, atol=1e-5)


def test_discovery_train_prune_save_load_remove(tmp_path):
    data = batches(n=2)
    m = model_with_head()
    base_keys = set(m.state_dict())

    def hidden(model):
        with torch.no_grad():
            b = data[0]
            return model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state

    plain = hidden(m)
    pl = _plan("seq@L0.ffn", "par@L0.ffn", "long@emb->L1.ffn", r=6)
    inst = P.apply(m, pl, name="pl", head="h", seed=0)
    found = find_adapters(m, pattern=inst.pattern)
    assert sorted(i.name for i in found) == [
        "bert.encoder.layer.0.output.adapters.pl_seq_ffn",
        "tropfast_placement.pl_long_emb_L1_ffn",
        "tropfast_placement.pl_par_L0_ffn",
    ]
    assert {i.kind for i in found} == {"adapters", "module"} and all(i.r == 6 and i.is_relu for i in found)
    # train: only the placement's adapters and the head move
    params = inst.train_only(head="h")
    backbone = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    lr_up = inst.modules["long@emb->L1.ffn"].up.weight
    assert torch.count_nonzero(lr_up) == 0  # the long-range adapter starts as a no-op (up = 0)
    opt = torch.optim.Adam(params, lr=1e-2)
    m.train()
    losses = []
    for _ in range(15):
        loss = sum(m(**b).loss for b in data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    m.eval()
    assert losses[-1] < 0.7 * losses[0]
    assert torch.count_nonzero(lr_up) > 0
    assert all(torch.equal(p, backbone[n]) for n, p in m.named_parameters() if n in backbone)
    # prune all three together; allocation by gradient rank
    rep = tropfast.prune(m, keep=0.4, score="magnitude", allocation="gradient_rank", pattern=inst.pattern, data=data)
    assert rep.kept == round(0.4 * rep.total) and len(rep.adapters) == 3
    trained = logits(m, data)
    nz = {n: int(torch.count_nonzero(p)) for n, p in inst.named_parameters() if n.endswith("weight")}
    # save, then load into a fresh copy of the backbone
    path = P.save(m, tmp_path / "placed", name="pl", head="h")
    fresh = model_with_head(head="other")
    loaded = P.load(fresh, path)
    assert loaded.via == inst.via and loaded.hub == inst.hub
    torch.testing.assert_close(logits(fresh, data), trained, rtol=1e-6, atol=1e-6)
    assert {n: int(torch.count_nonzero(p)) for n, p in loaded.named_parameters() if n.endswith("weight")} == nz
    # remove: the encoder is the backbone again
    assert (hidden(m) - plain).abs().max() > 1e-3
    P.remove(m, "pl")
    assert set(m.state_dict()) == base_keys and hook_objects(m) == 0 and P.installed(m) == []
    torch.testing.assert_close(hidden(m), plain)


def test_structured_pruning_shrinks_and_reloads(tmp_path):
    data = batches(n=1)
    m = model_with_head()
    inst = P.apply(m, _plan("seq@L1.attn", "long@L0->L1.ffn", r=8), name="st", seed=2)
    _randomise(inst.parameters(), seed=3)
    rep = tropfast.prune(m, keep=0.5, score="magnitude", allocation="structured", pattern=inst.pattern)
    assert [a.r_after for a in rep.adapters] == [4, 4]
    assert inst.modules["long@L0->L1.ffn"].down.weight.shape == (4, 32)
    want = logits(m, data)
    path = P.save(m, tmp_path / "st", name="st")
    fresh = model_with_head()
    back = P.load(fresh, path)
    assert back.modules["long@L0->L1.ffn"].down.weight.shape == (4, 32)
    torch.testing.assert_close(logits(fresh, data), want, rtol=1e-6, atol=1e-6)


def test_deepcopy_and_prune_copy_use_their_own_adapters():
    data = batches(n=1)
    m = model_with_head()
    inst = P.apply(m, _plan("long@emb->L1.ffn", "par@L1.attn", r=4), name="cp", hub=False)
    _randomise(inst.parameters(), seed=4)
    before = logits(m, data)
    rep = tropfast.prune(m, keep=0.3, score="magnitude", pattern=inst.pattern, inplace=False)
    assert P.installed(rep.model) == ["cp"]
    copy_out = logits(rep.model, data)
    assert (copy_out - before).abs().max() > 1e-4  # the copy's pruned adapters are the ones it runs
    torch.testing.assert_close(logits(m, data), before)  # the original is untouched
    c2 = copy.deepcopy(m)
    _randomise(P.installed(c2, "cp").parameters(), seed=9)
    assert (logits(c2, data) - before).abs().max() > 1e-3
    torch.testing.assert_close(logits(m, data), before)


def test_apply_is_atomic_and_checks_inputs():
    m = model_with_head()
    keys = set(m.state_dict())
    adapters_before = dict(m.adapters_config.adapters)
    pl = _plan("seq@L0.ffn", "long@emb->L1.ffn")
    with pytest.raises(ValueError, match="init_weights"):  # fails after the AdapterHub adapter was added
        P.apply(m, pl, name="bad", config={"long": {"init_weights": "houlsby"}})
    assert set(m.state_dict()) == keys and hook_objects(m) == 0 and dict(m.adapters_config.adapters) == adapters_before
    assert P.installed(m) == []
    with pytest.raises(ValueError, match="init_weights"):  # the second AdapterHub adapter fails: the first goes too
        P.apply(m, _plan("seq@L0.ffn", "par@L1.ffn"), name="bad", config={"par": {"init_weights": "nope"}})
    assert set(m.state_dict()) == keys and dict(m.adapters_config.adapters) == adapters_before
    with pytest.raises(KeyError, match="no prediction head"):
        P.apply(m, pl, name="nohead", head="missing")
    assert set(m.state_dict()) == keys and P.installed(m) == []
    m.add_classification_head("clash_head", num_labels=2)
    keys = set(m.state_dict())
    with pytest.raises(ValueError, match="another name"):  # heads.clash_head matches the glob *.clash_*
        P.apply(m, pl, name="clash")
    assert set(m.state_dict()) == keys and hook_objects(m) == 0
    with pytest.raises(ValueError, match="letters"):
        P.apply(m, pl, name="a.b")
    with pytest.raises(ValueError, match="unknown adapter config"):
        P.apply(m, pl, config={"reduction": 4})
    with pytest.raises(ValueError, match="3 layers"):
        P.apply(m, P.Placement([P.parse_id("seq@L0.ffn", 32)], r=2, n_layers=3))
    with pytest.raises(ValueError, match="no connection"):
        P.apply(m, P.Placement([], r=2))
    P.apply(m, pl, name="ok")
    with pytest.raises(ValueError, match="already installed"):
        P.apply(m, pl, name="ok")


def test_config_overrides_and_plain_model():
    m = model_with_head()
    inst = P.apply(m, _plan("seq@L0.ffn", "long@L0->L1.ffn"), name="cf",
                   config={"scaling": 2.0, "long": {"init_weights": "bert"}})
    assert _hub_module(m, "cf", "seq@L0.ffn").scaling == 2.0
    lr = inst.modules["long@L0->L1.ffn"]
    assert lr.scaling == 2.0 and torch.count_nonzero(lr.up.weight) > 0  # bert init: small nonzero weights
    # a plain transformers BERT (no AdapterHub) gets hook adapters only
    from transformers import BertModel

    plain = BertModel(model_with_head().config)
    got = P.apply(plain, _plan("seq@L0.ffn", "par@L1.attn"), name="pb")
    assert set(got.via.values()) == {"hooks"} and got.hub == []
    out = plain(input_ids=batches(n=1)[0]["input_ids"]).last_hidden_state
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="AdapterHub"):
        P.apply(BertModel(model_with_head().config), _plan("seq@L0.ffn"), hub=True)


def test_load_checks_its_input(tmp_path):
    m = model_with_head()
    P.apply(m, _plan("seq@L0.ffn", "long@emb->L1.ffn"), name="ld")
    path = P.save(m, tmp_path / "ld", name="ld")
    from transformers import BertModel

    with pytest.raises(ValueError, match="AdapterHub model"):
        P.load(BertModel(model_with_head().config), path)
    with pytest.raises(FileNotFoundError, match="placement.json"):
        P.load(model_with_head(), tmp_path)
    with pytest.raises(ValueError, match="already installed"):
        P.load(m, path)
    three = model_with_head(layers=3)
    keys = set(three.state_dict())
    with pytest.raises(ValueError, match="2 layers"):
        P.load(three, path)
    assert set(three.state_dict()) == keys and hook_objects(three) == 0
