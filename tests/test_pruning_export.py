"""export_adapter: stock AdapterHub reload gives the same outputs; the sparse format round-trips."""
from __future__ import annotations

import json
import os

import pytest
from pruning_fixtures import base_copy, logits, same_state, state, tiny_model, tokens, torch

from tropfast.pruning import export_adapter, find_adapters, load_sparse_adapter, prune
from tropfast.pruning.export import read_sparse_adapter, reduction_factor_for
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
    from tropfast.pruning.export import read_sparse_adapter

    meta = read_sparse_adapter(path)[0]
    assert (meta["kind"], meta["adapter"], json.loads(meta["units"])) == ("module", "[02]", {"0": 4, "2": 4})
    assert "adapter_config" not in meta


# --- reliability (issue 10: defects 1, 2, 3, 8, 9, 11) --------------------------------------------
def _tree(root) -> dict:
    """Every path under root (links not followed) with its bytes (files), 'dir' or the link target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root)] = ("link", os.readlink(p)) if os.path.islink(p) else "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = ("link", os.readlink(p)) if os.path.islink(p) else open(p, "rb").read()
    return out


def _crowded(tmp_path):
    """A folder holding unrelated files, a subfolder and an earlier sparse export."""
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "keep" / "x.bin").write_bytes(b"\x00\x01")
    m = tiny_model()
    export_adapter(m, "a", out / "a.safetensors", format="sparse")
    return out


@pytest.mark.parametrize("suffix", ["", "/"])
def test_export_never_deletes_other_files(tmp_path, suffix):
    out = _crowded(tmp_path)
    before = _tree(tmp_path)
    m = tiny_model()
    with pytest.raises(FileExistsError, match="not empty .* not an earlier export of adapter 'a'"):
        export_adapter(m, "a", str(out) + suffix)
    assert _tree(tmp_path) == before


def test_export_refuses_current_folder_and_other_adapters(tmp_path, monkeypatch):
    m = tiny_model()
    (tmp_path / "mine.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="current folder"):
        export_adapter(m, "a", ".")
    with pytest.raises(FileExistsError, match="current folder"):
        export_adapter(m, "a", str(tmp_path.parent))
    assert (tmp_path / "mine.txt").read_text() == "keep me" and os.listdir(tmp_path) == ["mine.txt"]
    other = tmp_path / "b_export"
    m.save_adapter(str(other), "a")
    cfg = json.load(open(other / "adapter_config.json"))
    cfg["name"] = "b"
    json.dump(cfg, open(other / "adapter_config.json", "w"))
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match="not an earlier export of adapter 'a'"):
        export_adapter(m, "a", other)
    assert _tree(tmp_path) == before
    (tmp_path / "empty").mkdir()
    export_adapter(m, "a", tmp_path / "empty")  # an empty folder is fine
    assert torch.equal(logits(_reload(tmp_path / "empty"), tokens()), logits(m, tokens()))


def test_sparse_export_refuses_unrelated_file(tmp_path):
    m = tiny_model()
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not an adapter")
    with pytest.raises(FileExistsError, match="not an earlier sparse export of adapter 'a'"):
        export_adapter(m, "a", f, format="sparse")
    assert f.read_bytes() == b"not an adapter" and os.listdir(tmp_path) == ["model.safetensors"]
    out = export_adapter(m, "a", tmp_path / "a.safetensors", format="sparse")
    prune(m, 0.3, "magnitude")
    assert export_adapter(m, "a", out, format="sparse") == out  # an earlier export of the same adapter
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_honour_the_umask(tmp_path, umask):
    m = tiny_model()
    old = os.umask(umask)
    try:
        d = export_adapter(m, "a", tmp_path / "ad")
        f = export_adapter(m, "a", tmp_path / "a.safetensors", format="sparse")
    finally:
        os.umask(old)
    assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(f).st_mode & 0o777 == 0o666 & ~umask
    assert all(os.stat(os.path.join(d, x)).st_mode & 0o777 == 0o666 & ~umask for x in os.listdir(d))


def test_export_through_a_symlinked_folder(tmp_path):
    m = tiny_model()
    real = tmp_path / "real"
    export_adapter(m, "a", real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    prune(m, 0.2, "magnitude")
    export_adapter(m, "a", tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and os.readlink(tmp_path / "link") == str(real)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]  # no .old or .tmp left behind
    assert torch.equal(logits(_reload(real), tokens()), logits(m, tokens()))


def test_export_over_a_read_only_earlier_export(tmp_path):
    m = tiny_model()
    target = tmp_path / "ad"
    export_adapter(m, "a", target)
    before = _tree(tmp_path)
    os.chmod(target, 0o555)
    prune(m, 0.2, "magnitude")
    try:
        export_adapter(m, "a", target)
    except PermissionError as e:  # not root: refused before any work, untouched
        assert "read-only" in str(e)
        assert _tree(tmp_path) == before
    else:  # root may replace it: then completely
        assert torch.equal(logits(_reload(target), tokens()), logits(m, tokens()))
    finally:
        os.chmod(target, 0o755)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def _hidden_model(hidden: int):
    from adapters import AutoAdapterModel, SeqBnConfig
    from pruning_fixtures import tiny_config

    cfg = tiny_config()
    cfg.hidden_size = hidden
    torch.manual_seed(0)
    m = AutoAdapterModel.from_config(cfg)
    m.add_adapter("a", config=SeqBnConfig(reduction_factor=4, non_linearity="relu", mh_adapter=True))
    m.add_classification_head("a", num_labels=2)
    return m


def _masks_state(m):
    return state(m), [n for n, _ in masked_modules(m)]


def test_sparse_load_refuses_another_hidden_size(tmp_path):
    path = export_adapter(tiny_model(), "a", tmp_path / "a.safetensors", format="sparse")
    big = _hidden_model(48)
    before = _masks_state(big)
    want = r"adapter_down\.0\.weight: the file holds shape \(8, 32\), the model \(12, 48"
    with pytest.raises(ValueError, match=want):
        load_sparse_adapter(big, path)
    assert same_state(before[0], state(big))


def _rewrite(path, dest, meta_fn=None, tensor_fn=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_fn:
        meta_fn(meta)
    if tensor_fn:
        tensor_fn(tensors)
    save_file(tensors, str(dest), metadata=meta)
    return dest


def _shapes(edit):
    def fn(meta):
        shapes = json.loads(meta["shapes"])
        edit(shapes)
        meta["shapes"] = json.dumps(shapes)

    return fn


DOWN = "bert.encoder.layer.0.attention.output.adapters.a.adapter_down.0.weight"
DOWN_B = "bert.encoder.layer.0.attention.output.adapters.a.adapter_down.0.bias"
LN = "heads.a.1.bias"


@pytest.mark.parametrize(
    "meta_fn, tensor_fn, match",
    [
        (_shapes(lambda s: s.__setitem__(DOWN, [32, 8])), None, "adapter_down.0.weight: the file holds shape"),
        (_shapes(lambda s: s.__setitem__(DOWN, [16, 32])), None, "has 16 units in one tensor, 8 in"),
        (_shapes(lambda s: s.__setitem__(DOWN_B, [9])), None, "has shape \\(8,\\) but the metadata says \\(9,\\)"),
        (_shapes(lambda s: s.__setitem__(DOWN, [2, 32])), None, "indices of .* fall outside its shape"),
        (None, lambda t: t.__setitem__(DOWN + ":indices", t[DOWN + ":indices"].flip(0)), "repeated or out of order"),
        (None, lambda t: t.__setitem__(DOWN + ":values", t[DOWN + ":values"].long()), "int64 values"),
        (None, lambda t: t.pop(DOWN + ":values"), "named in the metadata is missing"),
        (None, lambda t: t.__setitem__("extra", torch.zeros(2)), "'extra' is not described by the metadata"),
        (lambda m: m.pop("shapes"), None, "the metadata has no 'shapes'"),
        (lambda m: m.__setitem__("sparse", "[not json"), None, "metadata 'sparse' is not valid JSON"),
        (lambda m: m.__setitem__("format", "other"), None, "is not a tropfast sparse adapter file"),
        (lambda m: m.__setitem__("adapter", "zz"), None, "holds adapter 'zz', which the model does not have"),
    ],
)
def test_sparse_load_checks_everything_before_writing(tmp_path, meta_fn, tensor_fn, match):
    m = tiny_model()
    prune(m, 0.3, "magnitude")
    good = export_adapter(m, "a", tmp_path / "a.safetensors", format="sparse")
    bad = _rewrite(good, tmp_path / "bad.safetensors", meta_fn, tensor_fn)
    target = tiny_model(seed=1)
    prune(target, 0.5, "random")
    before = _masks_state(target)
    with pytest.raises(ValueError, match=match) as e:
        load_sparse_adapter(target, bad)
    assert "bad.safetensors" in str(e.value) or "adapter_down" in str(e.value)
    assert same_state(before[0], state(target)) and before[1] == [n for n, _ in masked_modules(target)]


def test_sparse_load_of_a_text_file_names_it(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_text("hello")
    with pytest.raises(ValueError, match="t.safetensors is not a readable safetensors file"):
        load_sparse_adapter(tiny_model(), f)


def test_sparse_load_without_masks_detaches_old_masks(tmp_path):
    dense = export_adapter(tiny_model(seed=1), "a", tmp_path / "d.safetensors", format="sparse")
    m = tiny_model()
    prune(m, 0.3, "magnitude")
    load_sparse_adapter(m, dense, keep_masks=False)
    assert not masked_modules(m)
    m.train_adapter("a")
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m(tokens(), labels=torch.tensor([0, 1, 1])).loss.backward()
    opt.step()
    for i in find_adapters(m):  # nothing zeroed by a stale mask
        assert int(i.down.weight.count_nonzero()) == i.down.weight.numel()


def test_earlier_export_that_resists_removal_leaves_nothing(tmp_path, monkeypatch):
    """As when a non-root user replaces a read-only earlier export: the first removal fails."""
    import shutil

    m = tiny_model()
    target = tmp_path / "ad"
    export_adapter(m, "a", target)
    real = shutil.rmtree
    calls = []

    def stubborn(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", stubborn)
    prune(m, 0.2, "magnitude")
    export_adapter(m, "a", target)
    assert len(calls) >= 2 and sorted(os.listdir(tmp_path)) == ["ad"]
    assert torch.equal(logits(_reload(target), tokens()), logits(m, tokens()))


# --- masks are re-applied at export, whatever the live weights hold (issue 16) ----------------------
def _dirty_masked_weights(m):
    """Write 0.01 into every masked (pruned) entry of the live weights, as an update outside an
    optimizer step would; the kept entries are left as they are.  Returns the kept values."""
    kept = {}
    with torch.no_grad():
        for i in find_adapters(m):
            for mod, name in ((i.down, i.down_name), (i.up, i.up_name)):
                mask = mod._buffers["tropfast_mask"]
                mod.weight[~mask] = 0.01
                kept[f"{name}.weight"] = torch.where(mask, mod.weight, torch.zeros_like(mod.weight)).clone()
    return kept


def test_hub_export_reapplies_the_masks(tmp_path):
    m = tiny_model()
    prune(m, keep=0.3, score="magnitude", allocation="matrix")  # round(0.3 * 256) = 77 per matrix
    kept = _dirty_masked_weights(m)
    assert all(int(i.down.weight.count_nonzero()) == 256 for i in find_adapters(m))  # the live weights are dense
    out = export_adapter(m, "a", tmp_path / "ad")
    sd = torch.load(os.path.join(out, "pytorch_adapter.bin"), map_location="cpu", weights_only=True)
    weights = {k: v for k, v in sd.items() if k.endswith(("adapter_down.0.weight", "adapter_up.weight"))}
    assert len(weights) == 8 and [int(v.count_nonzero()) for v in weights.values()] == [77] * 8
    for k, v in weights.items():  # saved under the model's own names, the kept values unchanged
        assert torch.equal(v, kept[k]), k


def test_sparse_export_reapplies_the_masks(tmp_path):
    from safetensors import safe_open

    m = tiny_model()
    prune(m, keep=0.3, score="magnitude", allocation="matrix")
    kept = _dirty_masked_weights(m)
    path = export_adapter(m, "a", tmp_path / "a.safetensors", format="sparse")
    with safe_open(path, framework="pt") as f:
        counts = {k[: -len(":values")]: f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(":values")}
    assert len(counts) == 8 and set(counts.values()) == {77}
    fresh = tiny_model(seed=3)
    load_sparse_adapter(fresh, path)
    for i in find_adapters(fresh):
        for mod, name in ((i.down, i.down_name), (i.up, i.up_name)):
            assert torch.equal(mod.weight, kept[f"{name}.weight"]), name


def _structured_then_masked():
    """Structured (global) to units 3, 2 | 2, 6 per layer, then a magnitude prune that masks
    weights inside the kept units: the hub export must pad each layer to its larger adapter
    and re-apply the masks on the padded copies."""
    m = tiny_model()
    prune(m, keep=0.4, score="magnitude", allocation="structured", structured_scope="global")
    prune(m, keep=0.2, score="magnitude", allocation="layer")
    infos = find_adapters(m)
    assert [i.r for i in infos] == [3, 2, 2, 6] and [i.layer for i in infos] == [0, 0, 1, 1]
    return m, infos


def test_hub_export_of_uneven_layers_pads_units_and_writes_the_config_in_full(tmp_path):
    m, infos = _structured_then_masked()
    x = tokens()
    ref = logits(m, x)
    live = {}
    for i in infos:
        masks = [mod._buffers["tropfast_mask"].clone() for mod in (i.down, i.up)]
        live[i.name] = (i.down.weight.detach() * masks[0], i.down.bias.detach().clone(), i.up.weight.detach() * masks[1])
        with torch.no_grad():  # written into masked places after the prune: the export masks them again
            i.down.weight.add_(0.01 * ~masks[0])
            i.up.weight.add_(0.01 * ~masks[1])
    out = export_adapter(m, "a", tmp_path / "uneven")
    meta = json.load(open(os.path.join(out, "adapter_config.json")))
    assert meta["config"]["reduction_factor"] == {"0": 32 / 3, "1": 32 / 6, "default": 4}
    assert int(32 // (32 / 3)) == 3 and int(32 // (32 / 6)) == 6
    assert meta["tropfast"] == {"units": {i.name: r for i, r in zip(infos, [3, 2, 2, 6])}}
    sd = torch.load(os.path.join(out, "pytorch_adapter.bin"), weights_only=True)
    for i, r, n in zip(infos, [3, 2, 2, 6], [3, 3, 6, 6]):
        down_w, down_b, up_w = live[i.name]
        w = sd[f"{i.down_name}.weight"]
        assert w.shape == (n, 32) and torch.equal(w[:r], down_w) and not w[r:].any()
        b = sd[f"{i.down_name}.bias"]
        assert b.shape == (n,) and torch.equal(b[:r], down_b) and not b[r:].any()
        u = sd[f"{i.up_name}.weight"]
        assert u.shape == (32, n) and torch.equal(u[:, :r], up_w) and not u[:, r:].any()
    with torch.no_grad():
        for i in infos:  # the live model with its masks applied again, for the reference outputs
            for mod in (i.down, i.up):
                mod.weight.mul_(mod._buffers["tropfast_mask"])
    assert torch.allclose(logits(m, x), ref, rtol=1e-6, atol=1e-6)
    fresh = _reload(out)
    assert [i.r for i in find_adapters(fresh)] == [3, 3, 6, 6]
    assert torch.allclose(logits(fresh, x), ref, rtol=1e-5, atol=1e-6)


def _drop_on_save(monkeypatch, m, key):
    save = m.save_adapter

    def save_without(path, name, **kw):
        save(path, name, **kw)
        w = os.path.join(path, "pytorch_adapter.bin")
        sd = torch.load(w, weights_only=True)
        del sd[key]
        torch.save(sd, w)

    monkeypatch.setattr(m, "save_adapter", save_without)


def test_hub_export_of_uneven_layers_without_a_bias(tmp_path, monkeypatch):
    """A layer saved without a down bias is padded without one; a missing weight is an error
    naming it, and nothing is left behind."""
    m, infos = _structured_then_masked()
    key = f"{infos[1].down_name}.bias"
    _drop_on_save(monkeypatch, m, key)
    out = export_adapter(m, "a", tmp_path / "nobias")
    sd = torch.load(os.path.join(out, "pytorch_adapter.bin"), weights_only=True)
    assert key not in sd and sd[f"{infos[1].down_name}.weight"].shape == (3, 32)
    m2, infos2 = _structured_then_masked()
    key = f"{infos2[3].up_name}.weight"
    _drop_on_save(monkeypatch, m2, key)
    with pytest.raises(KeyError, match=f"{key} is missing from the weights saved by save_adapter"):
        export_adapter(m2, "a", tmp_path / "noweight")
    assert sorted(os.listdir(tmp_path)) == ["nobias"]


def test_sparse_load_of_uneven_units_into_a_full_model_in_full(tmp_path):
    """Units 3, 2 | 2, 6 saved sparse, loaded into a full-size model with keep_masks: each
    Linear takes the file's shape and its in/out features, each adapter its r and its
    AdapterHub down_sample, the masks are exactly the stored nonzeros, requires_grad stays
    what the model's parameter had, and the outputs are the pruned model's."""
    m, infos = _structured_then_masked()
    x = tokens()
    ref = logits(m, x)
    f = export_adapter(m, "a", tmp_path / "u.safetensors", format="sparse")
    target = tiny_model()  # the same backbone; its adapter is overwritten by the file
    with torch.no_grad():
        for i in find_adapters(target):
            i.down.weight.mul_(2.0)
    frozen = find_adapters(target)[2].up.weight
    frozen.requires_grad_(False)
    names = load_sparse_adapter(target, f, keep_masks=True)
    got = find_adapters(target)
    assert [i.r for i in got] == [3, 2, 2, 6]
    for i, j, r in zip(got, infos, [3, 2, 2, 6]):
        assert i.down.weight.shape == (r, 32) and (i.down.out_features, i.down.in_features) == (r, 32)
        assert i.up.weight.shape == (32, r) and (i.up.out_features, i.up.in_features) == (32, r)
        assert i.down.bias.shape == (r,)
        assert target.get_submodule(i.name).down_sample == r
        for mod, src in ((i.down, j.down), (i.up, j.up)):
            want = src.weight.detach() * src._buffers["tropfast_mask"]
            assert torch.equal(mod.weight.detach(), want)
            assert torch.equal(mod._buffers["tropfast_mask"], want != 0)
    assert got[2].up.weight.requires_grad is False and got[1].up.weight.requires_grad is True
    want_names = {f"{i.down_name}.weight" for i in infos} | {f"{i.down_name}.bias" for i in infos}
    want_names |= {f"{i.up_name}.weight" for i in infos} | {f"{i.up_name}.bias" for i in infos}
    assert want_names <= set(names) and len(names) == len(set(names))
    assert torch.allclose(logits(target, x), ref, rtol=1e-5, atol=1e-6)


def _drop_bias_shape(meta):
    s = json.loads(meta["shapes"])
    s.pop(DOWN_B)
    meta["shapes"] = json.dumps(s)


@pytest.mark.parametrize(
    "tensor_fn, meta_fn, match",
    [
        (lambda t: t.pop(DOWN_B), _drop_bias_shape,
         "resizes the bottleneck of bert.encoder.layer.0.attention.output.adapters.a to 3 units but holds no " + DOWN_B),
        (None, lambda m: m.__setitem__("units", json.dumps({**json.loads(m["units"]), "bert.encoder.layer.0.attention.output.adapters.a": 5})),
         "metadata 'units' gives bert.encoder.layer.0.attention.output.adapters.a 5 units, its tensors 3"),
        (lambda t: t.__setitem__(DOWN_B, t[DOWN_B].double().add(1e300)), None, DOWN_B + " in .* does not fit the model's torch.float32"),
    ],
    ids=["resized without its bias", "units metadata", "too large for float32"],
)
def test_sparse_load_of_uneven_units_refuses_in_full(tmp_path, tensor_fn, meta_fn, match):
    m, _ = _structured_then_masked()
    good = export_adapter(m, "a", tmp_path / "u.safetensors", format="sparse")
    bad = _rewrite(good, tmp_path / "bad.safetensors", meta_fn, tensor_fn)
    target = tiny_model(seed=1)
    before = state(target)
    with pytest.raises(ValueError, match=match):
        load_sparse_adapter(target, bad)
    assert same_state(before, state(target)) and [i.r for i in find_adapters(target)] == [8, 8, 8, 8]


# --- the config AdapterHub reads back, in full ------------------------------------------------------
def _config(out):
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
        return f.read()


def test_hub_export_writes_the_config_sorted_and_indented_and_fsyncs_every_file(tmp_path, monkeypatch):
    from tropfast.pruning import export as ex

    synced = []
    real = ex._fsync
    monkeypatch.setattr(ex, "_fsync", lambda p: (synced.append(p), real(p))[1])
    m = tiny_model()
    prune(m, keep=0.4, score="magnitude", allocation="structured", structured_scope="layer")
    out = export_adapter(m, "a", tmp_path / "cfg")
    text = _config(out)
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
    files = sorted(os.listdir(out))
    assert sorted(os.path.basename(p) for p in synced) == files
    assert {os.path.basename(os.path.dirname(p)).startswith(".cfg.tmp.") for p in synced} == {True}


@pytest.mark.parametrize(
    "rf, prune_scope, want_rf, want_units",
    [
        ({"0": 8, "default": 4}, None, {"0": 8, "default": 4}, [4, 4, 8, 8]),
        ({"0": 8, "default": 4}, "layer", {"0": 16, "1": 8, "default": 4}, [2, 2, 4, 4]),
        ({"0": 8, "1": 4}, "layer", {"0": 16, "1": 8, "default": 8}, [2, 2, 4, 4]),
        (32 / 9 + 4e-16, None, 32 / 9 + 4e-16, [8, 8, 8, 8]),
        (20, None, 20, [1, 1, 1, 1]),
    ],
    ids=["per-layer kept", "per-layer pruned", "per-layer without a default", "float rf whose quotient rounds up", "one unit"],
)
def test_hub_export_reads_the_saved_reduction_factors(tmp_path, rf, prune_scope, want_rf, want_units):
    """The reduction factor a config gives each layer (a mapping with or without 'default',
    a float whose hidden / rf rounds up to one unit more than AdapterHub's floor division)
    is read as AdapterHub reads it: an unchanged adapter keeps its config, a pruned one gets
    per-layer factors and keeps the config's default (or, without one, the largest layer's)."""
    m = tiny_model(reduction_factor=rf)
    if prune_scope:
        prune(m, keep=0.5, score="magnitude", allocation="structured", structured_scope=prune_scope)
    assert [i.r for i in find_adapters(m)] == want_units
    out = export_adapter(m, "a", tmp_path / "rf")
    assert json.loads(_config(out))["config"]["reduction_factor"] == want_rf
    fresh = _reload(out)
    assert [i.r for i in find_adapters(fresh)] == want_units
    x = tokens()
    assert torch.allclose(logits(fresh, x), logits(m, x), rtol=1e-5, atol=1e-6)


def test_hub_export_sizes_units_by_the_configs_hidden_size(tmp_path, monkeypatch):
    """AdapterHub sizes a bottleneck from the model's hidden size, which the saved config
    carries; the export reads it there (a config claiming 64 makes rf 4 mean 16 units, so
    the 8 units need rf 8)."""
    m = tiny_model()
    save = m.save_adapter

    def save_claiming_64(path, name, **kw):
        save(path, name, **kw)
        p = os.path.join(path, "adapter_config.json")
        meta = json.load(open(p))
        meta["hidden_size"] = 64
        json.dump(meta, open(p, "w"))

    monkeypatch.setattr(m, "save_adapter", save_claiming_64)
    out = export_adapter(m, "a", tmp_path / "h64")
    assert json.loads(_config(out))["config"]["reduction_factor"] == 8


def test_hub_export_with_and_without_the_head_and_of_a_headless_model(tmp_path):
    import adapters
    from adapters import SeqBnConfig
    from pruning_fixtures import tiny_config
    from transformers import BertModel

    m = tiny_model()
    assert "head_config.json" in os.listdir(export_adapter(m, "a", tmp_path / "with"))
    assert sorted(os.listdir(export_adapter(m, "a", tmp_path / "without", with_head=False))) == [
        "adapter_config.json",
        "pytorch_adapter.bin",
    ]
    torch.manual_seed(0)
    base = BertModel(tiny_config())
    adapters.init(base)
    base.add_adapter("a", config=SeqBnConfig(reduction_factor=4))
    assert not hasattr(base, "heads")
    out = export_adapter(base, "a", tmp_path / "headless")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "pytorch_adapter.bin"]


def _two_adapter_model():
    from adapters import SeqBnConfig

    m = tiny_model()
    m.add_adapter("b", config=SeqBnConfig(reduction_factor=2))
    return m


def test_exports_of_one_adapter_of_two_hold_that_adapter_only(tmp_path):
    m = _two_adapter_model()
    names = [i.name for i in find_adapters(m, adapter="a")]
    assert len(names) == 4 and len(find_adapters(m)) == 6  # b: output adapters only
    hub = export_adapter(m, "a", tmp_path / "hub")
    assert json.loads(_config(hub))["tropfast"] == {"units": {n: 8 for n in names}}
    sparse = export_adapter(m, "a", tmp_path / "a.safetensors", format="sparse")
    meta, dense, stored = read_sparse_adapter(sparse)
    assert json.loads(meta["units"]) == {n: 8 for n in names}
    assert stored == {f"{n}.adapter_down.0.weight" for n in names} | {f"{n}.adapter_up.weight" for n in names}
    assert all(".adapters.a." in k or k.startswith("heads.a.") for k in dense)


def test_sparse_export_holds_the_invertible_adapter_of_a_base_model(tmp_path):
    import adapters
    from adapters import SeqBnInvConfig
    from pruning_fixtures import tiny_config
    from transformers import BertModel

    def model():
        torch.manual_seed(0)
        base = BertModel(tiny_config())
        adapters.init(base)
        base.add_adapter("a", config=SeqBnInvConfig(reduction_factor=4))
        return base

    src = model()
    inv = {k: v for k, v in src.state_dict().items() if k.startswith("invertible_adapters.a.")}
    assert inv
    f = export_adapter(src, "a", tmp_path / "inv.safetensors", format="sparse")
    _, dense, _ = read_sparse_adapter(f)
    assert inv.keys() <= dense.keys() and all(torch.equal(dense[k], v) for k, v in inv.items())


def test_hub_export_refuses_unsupported_layers_in_full(tmp_path):
    m = tiny_model()
    info = find_adapters(m)[1]
    info.up.__dict__["in_features"] = 7  # as if the up Linear took another size than down gives
    with pytest.raises(ValueError) as e:
        export_adapter(m, "a", tmp_path / "bad")
    assert str(e.value) == "adapter 'a' holds unsupported layers (down Linear has 8 outputs but up Linear takes 7)"
    assert os.listdir(tmp_path) == []


def test_hub_export_masks_layers_whose_down_projection_has_no_mask(tmp_path):
    from tropfast.pruning.masks import attach_mask

    m = tiny_model()
    infos = find_adapters(m)
    for i in infos:
        g = torch.Generator().manual_seed(len(i.name))
        attach_mask(i.up, torch.rand(i.up.weight.shape, generator=g) < 0.5)
        with torch.no_grad():
            i.up.weight.add_(0.01 * ~i.up._buffers["tropfast_mask"])
    out = export_adapter(m, "a", tmp_path / "uponly")
    sd = torch.load(os.path.join(out, "pytorch_adapter.bin"), weights_only=True)
    for i in infos:
        mask = i.up._buffers["tropfast_mask"]
        assert torch.equal(sd[f"{i.up_name}.weight"], i.up.weight.detach() * mask)
        assert torch.equal(sd[f"{i.down_name}.weight"], i.down.weight.detach())


# --- sparse loads: every adapter's sizes agree, adapters missing from a file are left alone ----------
UP = "bert.encoder.layer.0.attention.output.adapters.a.adapter_up.weight"
LAST = "bert.encoder.layer.1.output.adapters.a"


def _drop(meta, tensors, keys):
    shapes, sparse = json.loads(meta["shapes"]), json.loads(meta["sparse"])
    for k in keys:
        shapes.pop(k)
        if k in sparse:
            sparse.remove(k)
            tensors.pop(f"{k}:values"), tensors.pop(f"{k}:indices")
        else:
            tensors.pop(k)
    meta["shapes"], meta["sparse"] = json.dumps(shapes), json.dumps(sparse)


def _edit(path, dest, fn):
    """``_rewrite`` with one edit ``fn(meta, tensors)`` that changes both together."""
    seen = {}
    return _rewrite(path, dest, meta_fn=lambda meta: seen.update(meta=meta), tensor_fn=lambda t: fn(seen["meta"], t))


def _down_rows(prefix, rows):
    """Keep the first ``rows`` units of the down projection (weight stored sparse, bias dense)."""

    def fn(meta, t):
        shapes = json.loads(meta["shapes"])
        w = f"{prefix}.adapter_down.0.weight"
        keep = t[f"{w}:indices"] < rows * shapes[w][1]
        t[f"{w}:values"], t[f"{w}:indices"] = t[f"{w}:values"][keep], t[f"{w}:indices"][keep]
        shapes[w][0] = rows
        b = f"{prefix}.adapter_down.0.bias"
        t[b] = t[b][:rows].clone()
        shapes[b] = [rows]
        meta["shapes"] = json.dumps(shapes)

    return fn


def _up_cols(meta, t):
    shapes = json.loads(meta["shapes"])
    rows, cols = shapes[UP]
    idx = t[f"{UP}:indices"].long()
    keep = idx % cols < 3
    t[f"{UP}:values"] = t[f"{UP}:values"][keep]
    t[f"{UP}:indices"] = ((idx[keep] // cols) * 3 + idx[keep] % cols).to(torch.int32)
    shapes[UP] = [rows, 3]
    meta["shapes"] = json.dumps(shapes)


@pytest.mark.parametrize(
    "fn, message",
    [
        (
            lambda meta, t: (
                _down_rows(DOWN[: -len(".adapter_down.0.weight")], 3)(meta, t),
                t.pop(DOWN_B),
                meta.__setitem__(
                    "shapes", json.dumps({k: v for k, v in json.loads(meta["shapes"]).items() if k != DOWN_B})
                ),
            ),
            "{p}: the bottleneck of bert.encoder.layer.0.attention.output.adapters.a has 3 units in one tensor, 8 in "
            + UP,
        ),
        (
            _up_cols,
            "{p}: the bottleneck of bert.encoder.layer.0.attention.output.adapters.a has 8 units in one tensor, 3 in "
            + UP,
        ),
        (
            lambda meta, t: (
                t.__setitem__(DOWN_B, t[DOWN_B][:3].clone()),
                meta.__setitem__("shapes", json.dumps({**json.loads(meta["shapes"]), DOWN_B: [3]})),
            ),
            "{p}: the bottleneck of bert.encoder.layer.0.attention.output.adapters.a has 8 units in one tensor, 3 in "
            + DOWN_B,
        ),
        (
            lambda meta, t: (_down_rows(LAST, 3)(meta, t), _drop(meta, t, [f"{LAST}.adapter_up.weight"])),
            "{p} resizes the bottleneck of " + LAST + " to 3 units but holds no " + LAST + ".adapter_up.weight",
        ),
    ],
    ids=["down rows", "up columns", "down bias", "a later adapter resized without its up"],
)
def test_sparse_load_refuses_disagreeing_unit_counts_in_full(tmp_path, fn, message):
    good = export_adapter(tiny_model(), "a", tmp_path / "g.safetensors", format="sparse")
    bad = _edit(good, tmp_path / "bad.safetensors", fn)
    target = tiny_model(seed=1)
    before = state(target)
    with pytest.raises(ValueError) as e:
        load_sparse_adapter(target, bad)
    assert str(e.value) == message.format(p=bad)
    assert same_state(before, state(target))


def test_sparse_load_leaves_adapters_the_file_lacks_alone(tmp_path):
    src = tiny_model()
    good = export_adapter(src, "a", tmp_path / "g.safetensors", format="sparse")
    last = [
        f"{LAST}.adapter_down.0.weight",
        f"{LAST}.adapter_down.0.bias",
        f"{LAST}.adapter_up.weight",
        f"{LAST}.adapter_up.bias",
    ]

    def fn(meta, t):
        _drop(meta, t, last)
        meta["units"] = json.dumps({k: v for k, v in json.loads(meta["units"]).items() if k != LAST})

    partial = _edit(good, tmp_path / "p.safetensors", fn)
    target = tiny_model(seed=1)
    before = state(target)
    written = load_sparse_adapter(target, partial)
    assert not set(last) & set(written)
    after = state(target)
    want = state(src)
    for k in after:
        assert torch.equal(after[k], before[k] if k in last or k not in written else want[k]), k


def test_sparse_load_resizes_in_the_models_dtype(tmp_path):
    m, _ = _structured_then_masked()
    f = export_adapter(m, "a", tmp_path / "u.safetensors", format="sparse")
    target = tiny_model().double()
    load_sparse_adapter(target, f)
    got = find_adapters(target)
    assert [i.r for i in got] == [3, 2, 2, 6]
    assert {p.dtype for i in got for p in (i.down.weight, i.down.bias, i.up.weight)} == {torch.float64}


def test_sparse_load_of_integer_tensors_needs_the_same_dtype(tmp_path):
    good = export_adapter(tiny_model(), "a", tmp_path / "g.safetensors", format="sparse")
    key = "bert.embeddings.position_ids"
    target = tiny_model(seed=1)
    ids = target.bert.embeddings.position_ids

    def add(dtype):
        def fn(meta, t):
            t[key] = ids.to(dtype).clone()
            meta["shapes"] = json.dumps({**json.loads(meta["shapes"]), key: list(ids.shape)})

        return fn

    same = _edit(good, tmp_path / "same.safetensors", add(ids.dtype))
    assert key in load_sparse_adapter(target, same)
    other = _edit(good, tmp_path / "other.safetensors", add(torch.int32))
    with pytest.raises(ValueError) as e:
        load_sparse_adapter(target, other)
    assert str(e.value) == f"{key}: the file holds torch.int32, the model {ids.dtype}"
