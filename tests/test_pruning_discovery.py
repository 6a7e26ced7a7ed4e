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


# --- the records in full, sparsity counted, plain modules in every arrangement -------------------
def test_to_dict_and_sparsity_in_full():
    m = tiny_model(reduction_factor=4, mh_adapter=True)
    info = find_adapters(m)[1]
    with torch.no_grad():
        info.down.weight[0, :5] = 0  # 5 zeros in A (8×32), 3 in B (32×8)
        info.up.weight[:3, 1] = 0
    assert info.sparsity() == 8 / 512
    assert info.to_dict() == {
        "name": "bert.encoder.layer.0.output.adapters.a",
        "kind": "adapters",
        "adapter": "a",
        "layer": 0,
        "location": "output_adapter",
        "shape_A": [8, 32],
        "shape_B": [32, 8],
        "activation": "relu",
        "supported": True,
        "reason": "",
        "sparsity": 8 / 512,
    }
    phm = find_adapters(tiny_model(mh_adapter=False, head=False, scale=1.0, phm_layer=True, phm_dim=2))[0]
    assert phm.down is None and phm.sparsity() == 0.0
    empty = torch.nn.ModuleDict({"ad": torch.nn.Sequential(torch.nn.Linear(6, 0), torch.nn.ReLU(), torch.nn.Linear(0, 6))})
    (e,) = find_adapters(empty, pattern="ad")
    assert e.numel == 0 and e.sparsity() == 0.0


def _plain(*mods):
    return torch.nn.ModuleDict({"ad": torch.nn.Sequential(*mods)})


def test_plain_module_roles_from_shapes_and_the_activation_between():
    lin = torch.nn.Linear
    # up registered first (3 -> 5 after 6 -> 3): the roles follow the shapes, not the order
    net = _plain(lin(3, 5), torch.nn.ReLU(), lin(6, 3))
    (i,) = find_adapters(net, pattern="ad")
    assert (i.down_name, i.up_name, i.shape_A, i.shape_B) == ("ad.2", "ad.0", (3, 6), (5, 3))
    assert i.kind == "module" and i.to_dict()["kind"] == "module" and i.adapter is None and i.layer is None
    assert i.module is net["ad"] and i.down is net["ad"][2] and i.up is net["ad"][0]
    # the activation between the two Linear layers wins over one elsewhere
    (i,) = find_adapters(_plain(torch.nn.Tanh(), lin(6, 3), torch.nn.ReLU(), lin(3, 6)), pattern="ad")
    assert i.activation == "relu"
    (i,) = find_adapters(_plain(lin(6, 3), torch.nn.ReLU(), torch.nn.GELU(), lin(3, 6), torch.nn.Tanh()), pattern="ad")
    assert i.activation == "relu"
    # none between: the module's activation elsewhere (a forward that applies it last)
    (i,) = find_adapters(_plain(lin(6, 3), lin(3, 6), torch.nn.ReLU()), pattern="ad")
    assert i.activation == "relu"
    # a name given in any case is the module's own
    (i,) = find_adapters(_plain(lin(6, 3), torch.nn.ReLU(), lin(3, 6)), pattern="ad", activation="ReLU")
    assert i.activation == "relu"


def test_plain_module_refusals_in_full():
    lin = torch.nn.Linear
    cases = [
        (torch.nn.ModuleDict({"ad": lin(6, 6)}),
         "module 'ad' (Linear) matches the pattern but holds 1 Linear layers; "
         "a bottleneck adapter needs exactly one down and one up Linear", None),
        (_plain(lin(6, 3), torch.nn.ReLU(), lin(3, 6), lin(6, 6)),
         "module 'ad' (Sequential) matches the pattern but holds 3 Linear layers; "
         "a bottleneck adapter needs exactly one down and one up Linear", None),
        (_plain(lin(6, 3), torch.nn.ReLU(), lin(4, 5)),
         "module 'ad': Linear '0' 6->3 and '2' 4->5 do not form a bottleneck", None),
        (_plain(lin(6, 3), torch.nn.Tanh(), lin(3, 6)), "module 'ad' applies 'tanh' but activation='relu' was given", "relu"),
        (_plain(lin(6, 3), lin(3, 6)),
         "module 'ad' holds no activation module between its Linear layers; if its forward applies relu "
         "functionally, pass activation='relu'", None),
    ]
    for net, message, act in cases:
        with pytest.raises(UnsupportedAdapterError) as e:
            find_adapters(net, pattern="ad", activation=act)
        assert str(e.value) == message


def test_hub_adapter_with_a_phm_down_and_a_linear_up_is_listed_unsupported():
    m = tiny_model(mh_adapter=False, head=False, scale=1.0, phm_layer=True, phm_dim=2)
    mod = m.get_submodule(find_adapters(m)[0].name)
    mod.adapter_up = torch.nn.Linear(8, 32)  # the down projection stays Kronecker-factored
    info = find_adapters(m)[0]
    assert info.supported is False and info.reason.startswith("PHM/Compacter layers")


def test_phm_record_in_full_and_a_hub_adapter_without_activation():
    m = tiny_model(mh_adapter=False, head=False, scale=1.0, phm_layer=True, phm_dim=2)
    assert find_adapters(m)[1].to_dict() == {
        "name": "bert.encoder.layer.1.output.adapters.a",
        "kind": "adapters",
        "adapter": "a",
        "layer": 1,
        "location": "output_adapter",
        "shape_A": [8, 32],
        "shape_B": [32, 8],
        "activation": "relu",
        "supported": False,
        "reason": "PHM/Compacter layers (phm_layer=True) are Kronecker-factored; only dense Linear bottlenecks can be pruned",
        "sparsity": 0.0,
    }
    plain = tiny_model(mh_adapter=False)
    mod = plain.get_submodule(find_adapters(plain)[0].name)
    mod.adapter_down = torch.nn.Sequential(mod.adapter_down[0])  # the Linear alone
    assert [i.activation for i in find_adapters(plain)] == ["identity", "relu"]


def test_activation_names_in_full():
    import functools

    from transformers.activations import GELUActivation

    from tropfast.pruning.discovery import activation_name

    hub = find_adapters(tiny_model(mh_adapter=False))[0]
    wrapper = hub.module.adapter_down[1]
    assert type(wrapper).__name__ == "Activation_Function_Class" and activation_name(wrapper) == "relu"

    class Activation(torch.nn.Module):  # the suffix alone is the name
        pass

    class SquareFunction(torch.nn.Module):
        pass

    class Wrapper(torch.nn.Module):  # an .f that is not AdapterHub's wrapper is not unwrapped
        f = torch.nn.ReLU()

    cases = [
        (torch.nn.Identity(), "identity"), (None, "identity"), (torch.nn.ReLU(), "relu"), (torch.relu, "relu"),
        (torch.nn.functional.relu, "relu"), (torch.nn.Tanh(), "tanh"), (GELUActivation(), "gelu"),
        (SquareFunction(), "square"), (Activation(), "activation"), (Wrapper(), "wrapper"), (torch.tanh, "tanh"),
        (functools.partial(torch.tanh), "partial"),
    ]
    assert [activation_name(a) for a, _ in cases] == [name for _, name in cases]


# --- AdapterHub modules in unusual shapes, the pattern and name filters, the messages ------------
def _hub(**kw):
    """The tiny model with one adapter per layer, and its first adapter module."""
    m = tiny_model(mh_adapter=False, head=False, **kw)
    return m, m.get_submodule(find_adapters(m)[0].name)


def test_hub_adapter_shapes_that_cannot_be_read_are_refused_in_full():
    m, mod = _hub()
    mod.adapter_up = torch.nn.Identity()
    with pytest.raises(UnsupportedAdapterError) as e:
        find_adapters(m)
    assert str(e.value) == (
        "adapter 'bert.encoder.layer.0.output.adapters.a': expected one Linear inside adapter_down and a Linear "
        "adapter_up, found 1 down layer(s) and adapter_up of type Identity"
    )
    m, mod = _hub()
    del mod.adapter_up
    with pytest.raises(UnsupportedAdapterError, match=r"found 1 down layer\(s\) and adapter_up of type NoneType$"):
        find_adapters(m)
    m, mod = _hub()
    del mod.adapter_down
    with pytest.raises(UnsupportedAdapterError, match=r"found 0 down layer\(s\) and adapter_up of type Linear$"):
        find_adapters(m)


def test_hub_adapter_with_a_bare_linear_down_and_mismatched_up():
    m, mod = _hub()
    mod.adapter_down = torch.nn.Linear(32, 8)  # no Sequential, no activation
    info = find_adapters(m)[0]
    assert info.down_name == "bert.encoder.layer.0.output.adapters.a.adapter_down"
    assert info.up_name == "bert.encoder.layer.0.output.adapters.a.adapter_up"
    assert (info.activation, info.supported, info.reason) == ("identity", True, "")
    mod.adapter_up = torch.nn.Linear(5, 32)
    info = find_adapters(m)[0]
    assert info.supported is False
    assert info.reason == "down Linear has 8 outputs but up Linear takes 5"


def test_hub_adapter_activation_is_the_last_one_and_a_functional_wrapper_counts():
    m, mod = _hub()
    lin = mod.adapter_down[0]
    mod.adapter_down = torch.nn.Sequential(lin, torch.nn.Tanh(), torch.nn.Sigmoid(), torch.nn.ReLU())
    assert find_adapters(m)[0].activation == "relu"
    # AdapterHub's wrapper holding a function, not a module: the wrapper itself is the activation
    m, mod = _hub()
    wrapper = mod.adapter_down[1]
    assert type(wrapper).__name__ == "Activation_Function_Class"
    del wrapper.f
    wrapper.f = torch.nn.functional.relu
    assert not list(wrapper.children())
    assert find_adapters(m)[0].activation == "relu"


def test_transformers_activations_count_and_modules_without_parameters_do_not():
    from transformers.activations import GELUActivation

    lin = torch.nn.Linear
    net = torch.nn.ModuleDict({
        "g": torch.nn.Sequential(lin(12, 3), GELUActivation(), lin(3, 12)),
        "d": torch.nn.Sequential(lin(12, 3), torch.nn.Dropout(0.0), torch.nn.ReLU(), lin(3, 12)),
    })
    assert [(i.name, i.activation) for i in find_adapters(net, pattern="[gd]")] == [("g", "gelu"), ("d", "relu")]


def test_hub_adapter_outside_an_adapter_layer_and_without_a_name():
    from adapters.methods.modeling import Adapter

    _, mod = _hub()
    holder = torch.nn.Module()
    holder.adapters = torch.nn.ModuleDict({"a": mod})  # a parent without layer_idx / location_key
    (info,) = find_adapters(holder)
    assert (info.name, info.layer, info.location, info.adapter) == ("adapters.a", None, None, "a")
    del mod.name
    assert isinstance(mod, Adapter) and find_adapters(holder)[0].adapter is None
    with pytest.raises(LookupError, match=r"^no AdapterHub adapter named 'a' in the model$"):
        find_adapters(holder, adapter="a")  # a nameless adapter is not the one asked for


def test_phm_record_names_module_and_missing_sizes():
    m = tiny_model(mh_adapter=False, head=False, scale=1.0, phm_layer=True, phm_dim=2)
    info = find_adapters(m)[0]
    mod = m.get_submodule(info.name)
    assert info.module is mod and info.down is None and info.up is None
    assert info.down_name == info.name + ".adapter_down" and info.up_name == info.name + ".adapter_up"
    del mod.input_size, mod.down_sample
    info = find_adapters(m)[0]
    assert (info.d_in, info.r, info.d_out, info.supported) == (0, 0, 0, False)


def test_pattern_filters_hub_adapters_and_skips_what_lies_inside_a_match():
    m = tiny_model(mh_adapter=False, head=False)
    # a pattern that excludes the first adapter still finds the later one; the modules inside
    # the matched adapter (adapter_down, ...) match too, and are skipped as part of it
    assert [i.layer for i in find_adapters(m, pattern="*.layer.1.output.adapters.*")] == [1]
    assert [i.layer for i in find_adapters(m, adapter="a", pattern="*.layer.1.*")] == [1]
    # the modules inside a matched plain adapter match too, but are part of it
    net = torch.nn.ModuleDict({"blocks": torch.nn.ModuleDict({"0": Bottleneck(), "1": Bottleneck()})})
    assert [i.name for i in find_adapters(net, pattern="blocks.*")] == ["blocks.0", "blocks.1"]


def test_a_pattern_over_the_modules_holding_hub_adapters_finds_the_adapters_themselves():
    """``adapters`` ModuleDicts (and other modules holding AdapterHub adapters) are not plain
    adapters: a pattern that matches them finds the hub adapters inside, as without it."""
    m = tiny_model(mh_adapter=False, head=False)
    want = [(i.name, i.kind, i.layer) for i in find_adapters(m)]
    assert all(kind == "adapters" for _, kind, _ in want)
    assert [(i.name, i.kind, i.layer) for i in find_adapters(m, pattern="*.adapters*")] == want
    # a plain model's own ModuleDict named "adapters" is the user's: matched as before
    net = torch.nn.Module()
    net.adapters = torch.nn.ModuleDict({"x": Bottleneck()})
    assert [i.name for i in find_adapters(net, pattern="adapters")] == ["adapters"]
    with pytest.raises(LookupError) as e:  # only the containers match: said so, with a pattern that works
        find_adapters(m, pattern="*.output.adapters")
    assert str(e.value) == (
        "the pattern '*.output.adapters' matches only modules that hold AdapterHub adapters "
        "(bert.encoder.layer.0.output.adapters, ...); match the adapters themselves "
        "(bert.encoder.layer.0.output.adapters.a, ...), or pass adapter=NAME"
    )


def test_lookup_messages_in_full():
    from adapters import SeqBnConfig

    m = tiny_model(mh_adapter=False, head=False)
    m.add_adapter("b", config=SeqBnConfig(reduction_factor=8))
    with pytest.raises(LookupError) as e:
        find_adapters(m, adapter="zz")
    assert str(e.value) == "no AdapterHub adapter named 'zz' in the model (adapters present: a, b)"
    with pytest.raises(LookupError) as e:
        find_adapters(m, adapter="zz", pattern="*")
    assert str(e.value) == "no AdapterHub adapter named 'zz' in the model"
    with pytest.raises(LookupError) as e:
        find_adapters(m, pattern="nothing.*")
    assert str(e.value) == "no module name matches the pattern 'nothing.*'"
    with pytest.raises(LookupError) as e:
        find_adapters(torch.nn.Linear(3, 3))
    assert str(e.value) == (
        "no bottleneck adapter found: the model has no AdapterHub adapter; for plain PyTorch "
        "adapters pass pattern='glob.on.*.module.names'"
    )
    # a name asked of a model without any AdapterHub adapter: that is what the message says
    plain = torch.nn.ModuleDict({"ad": Bottleneck()})
    with pytest.raises(LookupError, match=r"^no bottleneck adapter found: the model has no AdapterHub adapter;"):
        find_adapters(plain, adapter="a")


def test_sparsity_of_a_record_missing_a_module_is_zero():
    from tropfast.pruning.discovery import AdapterInfo

    lin = torch.nn.Linear(4, 2)
    torch.nn.init.zeros_(lin.weight)
    for down, up in ((lin, None), (None, lin), (None, None)):
        info = AdapterInfo("x", "module", None, None, None, 4, 2, 4, "relu", "x.d", "x.u", down=down, up=up)
        assert info.sparsity() == 0.0
