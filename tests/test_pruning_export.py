"""export_adapter: stock AdapterHub reload gives the same outputs; the sparse format round-trips."""
from __future__ import annotations

import json
import os

import pytest

from pruning_fixtures import base_copy, logits, tiny_model, tokens, torch

from tropfast.pruning import export_adapter, find_adapters, load_sparse_adapter, prune
from tropfast.pruning.export import reduction_factor_for
from tropfast.pruning.masks import masked_modules


def _reload(path, seed=0):
    fresh = base_copy(seed)
    name = fresh.load_adapter(str(path))
    fresh.set_active_adapters(name)
    fresh.eval()
    return fresh


def test_unstructured_export_reloads_identically(tmp_path):
    m = tiny_model()
    prune(m, keep=0.3, score="tropical", allocation="layer")
    out = export_adapter(m, "a", tmp_path / "pruned")
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    fresh = _reload(out)
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(m, x))
    for i in find_adapters(fresh):
        assert int(i.down.weight.count_nonzero()) + int(i.up.weight.count_nonzero()) <= round(0.3 * i.numel)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_structured_export_shrinks_config(tmp_path, scope):
    m = tiny_model()
    prune(m, keep=0.4, score="magnitude", allocation="structured", structured_scope=scope)
    sizes = [i.r for i in find_adapters(m)]
    out = export_adapter(m, "a", tmp_path / "s")
    meta = json.load(open(os.path.join(out, "adapter_config.json")))
    rf = meta["config"]["reduction_factor"]
    fresh = _reload(out)
    got = [i.r for i in find_adapters(fresh)]
    x = tokens()
    if scope == "layer":
        assert sizes == [3, 3, 3, 3] and got == sizes and not isinstance(rf, dict)
        assert torch.equal(logits(fresh, x), logits(m, x))
    else:
        assert isinstance(rf, dict) or len(set(sizes)) == 1
        # adapters in the same layer share a size: the smaller one is padded with zero units
        assert got == [max(sizes[0], sizes[1])] * 2 + [max(sizes[2], sizes[3])] * 2
        assert torch.allclose(logits(fresh, x), logits(m, x), rtol=1e-5, atol=1e-6)


def test_structured_all_units_removed_in_a_layer(tmp_path):
    m = tiny_model(mh_adapter=False)
    with torch.no_grad():
        find_adapters(m)[0].down.weight.mul_(1e-3)  # layer 0's units all score lowest
    prune(m, keep=0.5, score="magnitude", allocation="structured", structured_scope="global")
    assert [i.r for i in find_adapters(m)] == [0, 8]
    x = tokens()
    ref = logits(m, x)
    out = export_adapter(m, "a", tmp_path / "z")
    rf = json.load(open(os.path.join(out, "adapter_config.json")))["config"]["reduction_factor"]
    assert rf["0"] == 32 and rf["1"] == 4
    fresh = _reload(out)
    assert [i.r for i in find_adapters(fresh)] == [1, 8]
    assert torch.allclose(logits(fresh, x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("units", range(1, 33))
def test_reduction_factor_for_every_size(units):
    for hidden in (32, 384, 768):
        if units <= hidden:
            assert int(hidden // reduction_factor_for(hidden, units)) == units


def test_export_overwrites_atomically(tmp_path):
    m = tiny_model()
    target = tmp_path / "ad"
    export_adapter(m, "a", target)
    prune(m, keep=0.2, score="magnitude")
    export_adapter(m, "a", target)
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary left behind
    assert torch.equal(logits(_reload(target), tokens()), logits(m, tokens()))
    with pytest.raises(ValueError, match="format"):
        export_adapter(m, "a", tmp_path / "x", format="zip")
    with pytest.raises(ValueError, match="AdapterHub"):
        export_adapter(m, "nope", tmp_path / "x")
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_sparse_roundtrip(tmp_path):
    m = tiny_model()
    prune(m, keep=0.25, score="tropical", allocation="global")
    path = export_adapter(m, "a", tmp_path / "a.safetensors", format="sparse")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        nnz = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(":values"))
        assert all(f.get_slice(k).get_dtype() == "I32" for k in f.keys() if k.endswith(":indices"))
    assert nnz == round(0.25 * sum(i.numel for i in find_adapters(m)))
    other = tiny_model(seed=0)
    with torch.no_grad():
        for i in find_adapters(other):
            i.down.weight.normal_()
    written = load_sparse_adapter(other, path, keep_masks=True)
    assert any(k.endswith("adapter_up.weight") for k in written)
    x = tokens()
    assert torch.equal(logits(other, x), logits(m, x))
    assert len(masked_modules(other)) == 8


def test_sparse_structured_into_full_size_model(tmp_path):
    m = tiny_model()
    prune(m, keep=0.5, score="combined", allocation="structured", structured_scope="global")
    path = export_adapter(m, "a", tmp_path / "s.safetensors", format="sparse")
    fresh = tiny_model(seed=0)
    load_sparse_adapter(fresh, path)
    assert [i.r for i in find_adapters(fresh)] == [i.r for i in find_adapters(m)]
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(m, x))


def test_sparse_plain_module(tmp_path):
    from test_pruning_discovery import Bottleneck

    torch.manual_seed(0)
    net = torch.nn.Sequential(Bottleneck(16, 4), torch.nn.Linear(16, 16), Bottleneck(16, 4))
    prune(net, keep=0.3, score="magnitude", pattern="[02]")
    path = export_adapter(net, "[02]", tmp_path / "p.safetensors", format="sparse")
    torch.manual_seed(1)
    other = torch.nn.Sequential(Bottleneck(16, 4), torch.nn.Linear(16, 16), Bottleneck(16, 4))
    other[1].load_state_dict(net[1].state_dict())
    load_sparse_adapter(other, path)
    x = torch.randn(3, 16)
    assert torch.equal(other(x), net(x))
