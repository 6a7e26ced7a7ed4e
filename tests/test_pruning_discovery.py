"""Adapter discovery: AdapterHub modules by type, plain modules by pattern, refusals."""
from __future__ import annotations

import pytest
from pruning_fixtures import tiny_model, torch

from tropfast.pruning import UnsupportedAdapterError, find_adapters, prune


def test_finds_every_hub_adapter_with_shapes():
    m = tiny_model(reduction_factor=4, mh_adapter=True)
    infos = find_adapters(m)
    assert len(infos) == 4
    assert {(i.layer, i.location) for i in infos} == {
        (0, "mh_adapter"), (0, "output_adapter"), (1, "mh_adapter"), (1, "output_adapter")
    }
    for i in infos:
        assert (i.kind, i.adapter, i.activation) == ("adapters", "a", "relu")
        assert i.shape_A == (8, 32) and i.shape_B == (32, 8)
        assert i.down is m.get_submodule(i.down_name) and i.up is m.get_submodule(i.up_name)
        assert i.down.weight.shape == i.shape_A and i.up.weight.shape == i.shape_B
        assert i.to_dict()["sparsity"] == 0.0


def test_filter_by_adapter_name():
    m = tiny_model(mh_adapter=False)
    from adapters import SeqBnConfig

    m.add_adapter("b", config=SeqBnConfig(reduction_factor=8))
    assert len(find_adapters(m)) == 4
    bs = find_adapters(m, adapter="b")
    assert len(bs) == 2 and all(i.r == 4 and i.adapter == "b" for i in bs)
    with pytest.raises(LookupError, match="no AdapterHub adapter named 'zz'"):
        find_adapters(m, adapter="zz")


class Bottleneck(torch.nn.Module):
    def __init__(self, d=12, r=3, act=None):
        super().__init__()
        self.down = torch.nn.Linear(d, r)
        self.act = act if act is not None else torch.nn.ReLU()
        self.up = torch.nn.Linear(r, d)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))


class FunctionalBottleneck(torch.nn.Module):
    def __init__(self, d=12, r=3):
        super().__init__()
        self.proj_in = torch.nn.Linear(d, r)
        self.proj_out = torch.nn.Linear(r, d)

    def forward(self, x):
        return x + self.proj_out(torch.relu(self.proj_in(x)))


def test_plain_modules_by_pattern():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, 12), Bottleneck(), torch.nn.Linear(12, 12), torch.nn.Sequential(torch.nn.Linear(12, 4), torch.nn.ReLU(), torch.nn.Linear(4, 12))
    )
    infos = find_adapters(net, pattern="[13]")
    assert [i.name for i in infos] == ["1", "3"]
    assert infos[0].shape_A == (3, 12) and infos[0].down_name == "1.down" and infos[0].up_name == "1.up"
    assert infos[1].shape_A == (4, 12) and infos[1].activation == "relu"
    with pytest.raises(LookupError):
        find_adapters(net)  # no AdapterHub adapter and no pattern
    with pytest.raises(UnsupportedAdapterError, match="Linear"):
        find_adapters(net, pattern="0")  # a single Linear is no bottleneck


def test_plain_functional_activation_needs_to_be_named():
    net = torch.nn.ModuleDict({"ad": FunctionalBottleneck()})
    with pytest.raises(UnsupportedAdapterError, match="activation='relu'"):
        find_adapters(net, pattern="ad")
    (info,) = find_adapters(net, pattern="ad", activation="relu")
    assert info.activation == "relu" and info.down_name == "ad.proj_in"


def test_gelu_adapter_refused_unless_allowed():
    m = tiny_model(non_linearity="gelu", mh_adapter=False)
    assert {i.activation for i in find_adapters(m)} == {"gelu"}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UnsupportedAdapterError, match="gelu.*ReLU.*allow_non_relu"):
        prune(m, keep=0.5, score="magnitude")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    rep = prune(m, keep=0.5, score="magnitude", allow_non_relu=True)
    assert rep.kept_fraction == pytest.approx(0.5)


def test_swish_plain_module_refused():
    net = torch.nn.ModuleDict({"ad": Bottleneck(act=torch.nn.SiLU())})
    assert find_adapters(net, pattern="ad")[0].activation == "swish"
    with pytest.raises(UnsupportedAdapterError):
        prune(net, keep=0.5, score="magnitude", pattern="ad")


def test_phm_compacter_refused():
    m = tiny_model(mh_adapter=False, head=False, scale=1.0, phm_layer=True, phm_dim=2, reduction_factor=4)
    infos = find_adapters(m)
    assert infos and not any(i.supported for i in infos)
    assert "PHM" in infos[0].reason
    with pytest.raises(UnsupportedAdapterError, match="PHM"):
        prune(m, keep=0.5, score="magnitude")
