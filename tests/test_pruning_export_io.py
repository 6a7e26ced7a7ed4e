"""export.py's file helpers, on their own: atomic writes, folder swaps, destination checks and
reduction factors, each against hand-made folders (they serve export, the CLI, the fleet
writers and placement)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from pruning_fixtures import tiny_model
from safetensors import safe_open
from test_pruning_export import _rewrite as _edited

from tropfast.pruning import export as ex
from tropfast.pruning import load_sparse_adapter, prune


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_write_file_creates_missing_folders_and_the_default_mode(tmp_path):
    dest = tmp_path / "a" / "b" / "out.txt"
    got = ex.atomic_write_file(dest, lambda tmp: open(tmp, "w").write("hello"))
    assert got == str(dest) and dest.read_text() == "hello"
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o666 & ~_umask()
    assert sorted(os.listdir(dest.parent)) == ["out.txt"]


def test_atomic_write_file_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    os.chmod(dest, 0o640)

    def write(tmp):  # as safetensors does: recreate the file, mode 0o600
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"new")
        os.close(fd)

    ex.atomic_write_file(dest, write)
    assert dest.read_bytes() == b"new" and stat.S_IMODE(os.stat(dest).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_atomic_write_file_failure_leaves_nothing_it_made(tmp_path):
    dest = tmp_path / "new1" / "new2" / "out.txt"
    seen = []

    def fail(tmp):
        seen.append((os.path.isfile(tmp), os.path.dirname(tmp)))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ex.atomic_write_file(dest, fail)
    assert seen == [(True, str(dest.parent))]  # the temporary sits beside its destination
    assert os.listdir(tmp_path) == []
    keep = tmp_path / "keep.txt"
    keep.write_text("as it was")
    with pytest.raises(RuntimeError):
        ex.atomic_write_file(keep, fail)
    assert keep.read_text() == "as it was" and sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_atomic_write_file_refuses_a_folder_and_text_is_utf8(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory; give a file name"):
        ex.atomic_write_file(tmp_path, lambda tmp: None)
    dest = ex.atomic_write_text(tmp_path / "t.txt", "λ = 1e-3\n")
    assert open(dest, encoding="utf-8").read() == "λ = 1e-3\n"


def test_swap_in_a_file_a_new_folder_and_a_replaced_folder(tmp_path):
    tmp, dest, old = tmp_path / "tmp", tmp_path / "dest", tmp_path / "old"
    tmp.mkdir()
    (tmp / "x").write_text("1")
    assert ex.swap_in(str(tmp), str(dest), str(old)) is False
    assert (dest / "x").read_text() == "1" and not tmp.exists() and not old.exists()
    tmp.mkdir()
    (tmp / "x").write_text("2")
    assert ex.swap_in(str(tmp), str(dest), str(old)) is True
    assert (dest / "x").read_text() == "2" and (old / "x").read_text() == "1" and not tmp.exists()


def test_swap_in_puts_the_old_folder_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    tmp, dest, old = tmp_path / "tmp", tmp_path / "dest", tmp_path / "old"
    for d, v in ((tmp, "new"), (dest, "old")):
        d.mkdir()
        (d / "x").write_text(v)
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append((os.path.basename(a), os.path.basename(b)))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real(a, b)

    monkeypatch.setattr(ex.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        ex.swap_in(str(tmp), str(dest), str(old))
    assert calls == [("dest", "old"), ("tmp", "dest"), ("old", "dest")]
    assert (dest / "x").read_text() == "old" and (tmp / "x").read_text() == "new" and not old.exists()


def test_reduction_factor_for_hand_computed():
    assert ex.reduction_factor_for(32, 8) == 4 and type(ex.reduction_factor_for(32, 8)) is int
    assert ex.reduction_factor_for(32, 3) == 32 / 3 and int(32 // (32 / 3)) == 3
    assert ex.reduction_factor_for(768, 1) == 768
    with pytest.raises(ValueError, match="^an AdapterHub adapter has at least one unit$"):
        ex.reduction_factor_for(32, 0)


def test_check_export_destination_by_format(tmp_path):
    assert ex.check_export_destination(tmp_path / "out", "a") == str(tmp_path / "out")
    assert ex.check_export_destination(tmp_path / "out.safetensors", "a", "sparse") == str(tmp_path / "out.safetensors")
    assert ex.check_export_destination(str(tmp_path) + os.sep, "a", "sparse") == str(tmp_path / ex.SPARSE_FILENAME)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"^export destination {blocker}/out: {blocker} is a file, not a folder$"):
        ex.check_export_destination(blocker / "out", "a")
    assert not (tmp_path / "out").exists()


def test_hub_export_failure_removes_the_folders_it_made(tmp_path, monkeypatch):
    m = tiny_model()

    def fail(*a, **k):
        raise RuntimeError("save failed")

    monkeypatch.setattr(m, "save_adapter", fail)
    with pytest.raises(RuntimeError, match="save failed"):
        ex.export_adapter(m, "a", tmp_path / "n1" / "n2" / "out")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# the sparse file format: every refusal named in full, on hand-edited files
# ---------------------------------------------------------------------------------------
DOWN = "bert.encoder.layer.0.attention.output.adapters.a.adapter_down.0.weight"


@pytest.fixture(scope="module")
def sparse_file(tmp_path_factory):
    m = tiny_model()
    prune(m, 0.3, "magnitude")
    return ex.export_adapter(m, "a", tmp_path_factory.mktemp("sp") / "a.safetensors", format="sparse")


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _shape(key, value):
    def fn(meta):
        s = json.loads(meta["shapes"])
        s[key] = value
        meta["shapes"] = json.dumps(s)

    return fn


def _indices(fn):
    return lambda t: t.__setitem__(DOWN + ":indices", fn(t[DOWN + ":indices"]))


@pytest.mark.parametrize(
    "meta_fn, tensor_fn, message",
    [
        (_set("format", "other"), None, "{p} is not a tropfast sparse adapter file (its metadata has format='other')"),
        (_set("version", "7"), None, "{p}: sparse format version '7' is not supported (only 1)"),
        (_set("shapes", "[]"), None, "{p}: metadata 'shapes' must map tensor names to lists of sizes"),
        (_shape(DOWN, [8, -32]), None, "{p}: metadata 'shapes' must map tensor names to lists of sizes"),
        (_shape(DOWN, [8, True]), None, "{p}: metadata 'shapes' must map tensor names to lists of sizes"),
        (_set("sparse", '"x"'), None, "{p}: metadata 'sparse' must list tensors that 'shapes' describes"),
        (_set("sparse", '["nope"]'), None, "{p}: metadata 'sparse' must list tensors that 'shapes' describes"),
        (_set("units", '{"m": -1}'), None, "{p}: metadata 'units' must map module names to unit counts"),
        (_set("units", "[1]"), None, "{p}: metadata 'units' must map module names to unit counts"),
        (None, lambda t: t.__setitem__(DOWN + ":values", t[DOWN + ":values"][:-1]),
         "{p}: " + DOWN + " has ({v},) values for ({i},) indices"),
        (None, _indices(lambda i: torch.cat([i[:-1], i.new_tensor([256])])), "{p}: indices of " + DOWN + " fall outside its shape [8, 32]"),
        (None, _indices(lambda i: torch.cat([i[:-2], i[-1:], i[-2:-1]])), "{p}: indices of " + DOWN + " are repeated or out of order"),
        (None, _indices(lambda i: torch.cat([i[:-1], i[-2:-1]])), "{p}: indices of " + DOWN + " are repeated or out of order"),
        (None, lambda t: t.__setitem__(DOWN + ":values", torch.full_like(t[DOWN + ":values"], float("nan"))),
         "{p}: " + DOWN + " has non-finite values"),
    ],
    ids=["format", "version", "shapes-list", "shapes-negative", "shapes-bool", "sparse-string", "sparse-unknown",
         "units-negative", "units-list", "counts", "index-past-end", "order", "repeat", "nan"],
)
def test_sparse_file_refusals_in_full(tmp_path, sparse_file, meta_fn, tensor_fn, message):
    bad = _edited(sparse_file, tmp_path / "bad.safetensors", meta_fn, tensor_fn)
    with safe_open(str(sparse_file), framework="pt") as f:
        n = f.get_tensor(DOWN + ":values").numel()
    want = message.format(p=bad, v=n - 1, i=n)
    with pytest.raises(ValueError) as e:
        ex.read_sparse_adapter(bad)
    assert str(e.value) == want


def test_sparse_file_edge_values_that_are_valid(tmp_path, sparse_file):
    """Sizes of 0 and a single index are valid; a folder names the file inside it."""
    ok = _edited(sparse_file, tmp_path / "u.safetensors", _set("units", '{"m": 0}'))
    assert ex.read_sparse_adapter(ok)[0]["units"] == '{"m": 0}'
    no_units = _edited(sparse_file, tmp_path / "nu.safetensors", lambda m: m.pop("units"))
    assert "units" not in ex.read_sparse_adapter(no_units)[0]  # optional: files of older versions lack it
    def first(t, n):
        t[DOWN + ":values"], t[DOWN + ":indices"] = t[DOWN + ":values"][:n], t[DOWN + ":indices"][:n]

    one = _edited(sparse_file, tmp_path / "one.safetensors", None, lambda t: first(t, 1))
    assert int(ex.read_sparse_adapter(one)[1][DOWN].count_nonzero()) == 1
    two = _edited(sparse_file, tmp_path / "two.safetensors", None,
                  lambda t: (first(t, 2), t.__setitem__(DOWN + ":indices", t[DOWN + ":indices"].flip(0))))
    with pytest.raises(ValueError) as e:
        ex.read_sparse_adapter(two)
    assert str(e.value) == f"{two}: indices of {DOWN} are repeated or out of order"
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        ex.read_sparse_adapter(folder)
    assert str(e.value) == f"{folder / ex.SPARSE_FILENAME}: no such file"
    os.replace(sparse_file, folder / ex.SPARSE_FILENAME)
    try:
        meta, dense, sparse = ex.read_sparse_adapter(folder)
        assert DOWN in sparse and dense[DOWN].shape == (8, 32)
    finally:
        os.replace(folder / ex.SPARSE_FILENAME, sparse_file)


def test_sparse_load_strict_by_default_and_no_masks_by_default(tmp_path, sparse_file):
    # unknown names first: a missing module, then a missing attribute of an existing one
    extra = _edited(
        sparse_file, tmp_path / "extra.safetensors",
        lambda m: m.__setitem__("shapes", json.dumps({"nope.weight": [2], "bert.nope": [2], **json.loads(m["shapes"])})),
        lambda t: (t.__setitem__("nope.weight", torch.zeros(2)), t.__setitem__("bert.nope", torch.zeros(2))),
    )
    with pytest.raises(KeyError) as e:
        load_sparse_adapter(tiny_model(), extra)
    assert e.value.args[0] == f"nope.weight from {extra} has no counterpart in the model"
    m = tiny_model()
    names = load_sparse_adapter(m, extra, strict=False)
    assert "nope.weight" not in names and "bert.nope" not in names and DOWN in names and len(names) == 20
    from tropfast.pruning.masks import masked_modules

    assert masked_modules(m) == []
    wrong = _edited(sparse_file, tmp_path / "int.safetensors", None, lambda t: t.__setitem__(DOWN_B, t[DOWN_B].long()))
    with pytest.raises(ValueError) as e:
        load_sparse_adapter(tiny_model(), wrong)
    assert str(e.value) == f"{DOWN_B}: the file holds torch.int64, the model torch.float32"


DOWN_B = "bert.encoder.layer.0.attention.output.adapters.a.adapter_down.0.bias"


def test_sparse_destination_rules(tmp_path, sparse_file):
    """A folder (with or without a trailing separator) gets the file inside it; an existing
    file is replaced only when it is a sparse export of the same adapter; the refusals in full."""
    assert ex.check_export_destination(tmp_path, "a", "sparse") == str(tmp_path / ex.SPARSE_FILENAME)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not safetensors")
    with pytest.raises(FileExistsError) as e:
        ex.check_export_destination(other, "a", "sparse")
    assert str(e.value) == f"{other} exists and is not an earlier sparse export of adapter 'a'; export to a new file"
    assert ex.check_export_destination(sparse_file, "a", "sparse") == str(sparse_file)
    with pytest.raises(FileExistsError, match="is not an earlier sparse export of adapter 'b'"):
        ex.check_export_destination(sparse_file, "b", "sparse")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        ex.check_export_destination(blocker / "x.safetensors", "a", "sparse")
    assert str(e.value) == f"export destination {blocker}/x.safetensors: {blocker} is a file, not a folder"


def test_hub_destination_is_an_earlier_export_of_that_adapter_only(tmp_path):
    def folder(name, files):
        d = tmp_path / name
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        return d

    same = folder("same", {"adapter_config.json": json.dumps({"name": "a"}), "pytorch_adapter.bin": ""})
    assert ex.check_export_destination(same, "a") == str(same)
    for d, why in (
        (folder("other", {"adapter_config.json": json.dumps({"name": "b"})}), "other adapter"),
        (folder("extra", {"adapter_config.json": json.dumps({"name": "a"}), "notes.txt": ""}), "a foreign file"),
        (folder("noconfig", {"pytorch_adapter.bin": ""}), "no config"),
        (folder("broken", {"adapter_config.json": "{not json"}), "unreadable config"),
        (folder("list", {"adapter_config.json": "[]"}), "config not a mapping"),
    ):
        with pytest.raises(FileExistsError, match="is not an earlier export of adapter 'a'"):
            ex.check_export_destination(d, "a")
        assert ex._is_export_of(str(d), "a", sorted(os.listdir(d))) is False, why


def test_sparse_export_metadata_and_heads(tmp_path):
    m = tiny_model()
    with_head = ex.export_adapter(m, "a", tmp_path / "h.safetensors", format="sparse")
    without = ex.export_adapter(m, "a", tmp_path / "n.safetensors", format="sparse", with_head=False)
    meta_h, dense_h, _ = ex.read_sparse_adapter(with_head)
    meta_n, dense_n, _ = ex.read_sparse_adapter(without)
    assert any(k.startswith("heads.a.") for k in dense_h) and not any(k.startswith("heads.") for k in dense_n)
    assert meta_h["kind"] == "adapters" and meta_h["adapter"] == "a"
    assert json.loads(meta_h["adapter_config"]) == json.loads(json.dumps(m.adapters_config.get("a").to_dict(), default=str))


def test_sparse_load_sets_down_sample_past_an_unknown_module(tmp_path):
    """Unit counts of modules the model lacks are skipped, not the end of the list."""
    from tropfast.pruning import find_adapters

    m = tiny_model()
    prune(m, 0.4, "magnitude", "structured", structured_scope="global")
    f = ex.export_adapter(m, "a", tmp_path / "s.safetensors", format="sparse")
    edited = _edited(f, tmp_path / "e.safetensors", lambda meta: meta.__setitem__("units", json.dumps({"nope": 3, **json.loads(meta["units"])})))
    target = tiny_model()
    load_sparse_adapter(target, edited)
    want = [i.r for i in find_adapters(m)]
    assert [target.get_submodule(i.name).down_sample for i in find_adapters(target)] == want == [3, 2, 2, 6]


# ---------------------------------------------------------------------------------------
# destination refusals in full, and the checks that root passes anyway
# ---------------------------------------------------------------------------------------
def test_folder_destination_new_empty_and_refusals_in_full(tmp_path):
    new = tmp_path / "new"
    assert ex._folder_destination(str(new), "a") == (str(new), False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ex._folder_destination(str(empty), "a") == (str(empty), False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError) as e:
        ex._folder_destination(str(afile), "a")
    assert str(e.value) == f"{afile} exists and is not a folder"
    for names, shown in (
        (["a1", "a2", "a3", "a4"], "a1, a2, a3, a4"),
        (["a1", "a2", "a3", "a4", "a5"], "a1, a2, a3, a4, ..."),
    ):
        d = tmp_path / f"full{len(names)}"
        d.mkdir()
        for n in names:
            (d / n).write_text("")
        with pytest.raises(FileExistsError) as e:
            ex._folder_destination(str(d), "a")
        assert str(e.value) == (
            f"{d} is not empty ({shown}) and is not an earlier export of adapter 'a'; export into a new or empty folder"
        )


def _refuse_access(monkeypatch, modes):
    def access(path, mode):
        modes.append(mode)
        return False

    monkeypatch.setattr(ex.os, "access", access)


def test_write_permission_checks_ask_for_write_and_search(tmp_path, monkeypatch):
    """Root passes os.access, so the checks are driven here by a refusing os.access: both
    ask for write and search permission, and the refusals are named in full."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "adapter_config.json").write_text(json.dumps({"name": "a"}))
    modes: list[int] = []
    _refuse_access(monkeypatch, modes)
    with pytest.raises(PermissionError) as e:
        ex._folder_destination(str(earlier), "a")
    assert str(e.value) == f"{earlier} is a read-only earlier export of 'a'; make it writable to replace it"
    with pytest.raises(PermissionError) as e:
        ex.check_output_file(tmp_path / "sub" / "f.bin")
    assert str(e.value) == f"output {tmp_path}/sub/f.bin: cannot write in {tmp_path}"
    assert modes == [os.W_OK | os.X_OK] * 2


def test_check_output_file_names_the_output_by_default(tmp_path):
    with pytest.raises(IsADirectoryError) as e:
        ex.check_output_file(tmp_path)
    assert str(e.value) == f"output {tmp_path} is a directory; give a file name"
    with pytest.raises(IsADirectoryError, match=f"^summary {tmp_path} is a directory"):
        ex.check_output_file(tmp_path, "summary")


def test_the_root_folder_holds_every_working_folder():
    assert ex._inside_cwd(os.sep) is True


def test_install_folder_names_an_earlier_export_it_could_not_remove(tmp_path, monkeypatch):
    tmp, dest = tmp_path / "tmp", tmp_path / "dest"
    tmp.mkdir()
    dest.mkdir()
    (tmp / "x").write_text("new")

    def fail(path):
        raise OSError("disk says no")

    monkeypatch.setattr(ex, "_remove_tree", fail)
    monkeypatch.setattr(ex, "_sibling", lambda d, tag: f"{d}.{tag}")
    with pytest.raises(OSError) as e:
        ex._install_folder(str(tmp), str(dest), True)
    assert (
        str(e.value)
        == f"exported to {dest}, but the earlier export moved to {dest}.old could not be removed: disk says no"
    )
    assert (dest / "x").read_text() == "new"


def test_umask_is_read_without_setting_it_on_linux(monkeypatch):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc: the umask is read by setting it")
    want = _umask()

    def no_set(mask):
        raise AssertionError("the process umask was set")

    monkeypatch.setattr(ex.os, "umask", no_set)
    assert ex._umask() == want


def test_reduction_factor_below_one_unit_per_hidden_entry():
    """More units than the hidden size (rf < 1): hidden / units rounds so that the floor
    division gives one unit less, and the factor is nudged down until it is exact."""
    assert int(2 // 0.4) == 4
    rf = ex.reduction_factor_for(2, 5)
    assert rf < 0.4 and int(2 // rf) == 5 and rf == pytest.approx(0.4, rel=1e-15)


def test_sparse_values_of_another_rank_are_refused(tmp_path, sparse_file):
    def two_d(t):
        v = t[DOWN + ":values"]
        t[DOWN + ":values"] = v[: v.numel() // 2 * 2].reshape(-1, 2)
        i = t[DOWN + ":indices"]
        t[DOWN + ":indices"] = i[: v.numel() // 2 * 2]

    bad = _edited(sparse_file, tmp_path / "bad.safetensors", None, two_d)
    with safe_open(str(bad), framework="pt") as f:
        n = f.get_tensor(DOWN + ":indices").numel()
    with pytest.raises(ValueError) as e:
        ex.read_sparse_adapter(bad)
    assert str(e.value) == f"{bad}: {DOWN} has ({n // 2}, 2) values for ({n},) indices"


def test_umask_without_proc_is_read_by_setting_it_back(monkeypatch):
    """Where /proc/self/status cannot be read, the umask is read by setting it and setting it back."""
    import builtins

    want = _umask()
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path) == "/proc/self/status":
            raise OSError("no /proc here")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert ex._umask() == want
    assert _umask() == want  # and left as it was


def test_export_adapter_refusals_in_full(tmp_path):
    m = tiny_model()
    with pytest.raises(ValueError) as e:
        ex.export_adapter(m, "b", tmp_path / "x")
    assert str(e.value) == (
        "format='adapters' needs an AdapterHub model holding an adapter named 'b'; "
        "use format='sparse' for plain PyTorch adapters"
    )
    with pytest.raises(ValueError) as e:
        ex.export_adapter(m, "a", tmp_path / "x", format="zip")
    assert str(e.value) == "format='zip'; choose 'adapters' or 'sparse'"
    assert os.listdir(tmp_path) == []
