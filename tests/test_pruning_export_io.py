"""export.py's file helpers, on their own: atomic writes, folder swaps, destination checks and
reduction factors, each against hand-made folders (they serve export, the CLI, the fleet
writers and placement)."""
from __future__ import annotations

import os
import stat

import pytest
from pruning_fixtures import tiny_model

from tropfast.pruning import export as ex


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
