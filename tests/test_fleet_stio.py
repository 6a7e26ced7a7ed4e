"""Raw safetensors reading and writing (tropfast.fleet.stio)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tropfast.fleet.stio import CorruptFileError, read_header, read_tensors, write_replaced


@pytest.fixture
def st_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "backbone.big": torch.randn(16, 8, generator=g),
        "x.down.weight": torch.randn(4, 8, generator=g),
        "x.down.bias": torch.randn(4, generator=g),
        "x.up.weight": torch.randn(8, 4, generator=g),
        "h.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int64),
    }
    p = str(tmp_path / "w.safetensors")
    save_file(sd, p, metadata={"format": "pt", "note": "kept"})
    return p, sd


def _raw(path: str, name: str) -> bytes:
    h = read_header(path)
    info = h.tensors[name]
    with open(path, "rb") as f:
        f.seek(h.data_start + info.begin)
        return f.read(info.nbytes)


def test_read_header_matches_safe_open(st_file):
    p, sd = st_file
    h = read_header(p)
    assert h.metadata == {"format": "pt", "note": "kept"}
    assert set(h.tensors) == set(sd)
    assert h.tensors["h.bf16"].dtype == "BF16" and h.tensors["ids"].dtype == "I64"
    with safe_open(p, framework="pt") as f:
        for k in sd:
            assert list(h.tensors[k].shape) == list(f.get_slice(k).get_shape())
    # the raw bytes at the header's offsets are the tensors' bytes
    assert _raw(p, "x.down.weight") == sd["x.down.weight"].numpy().tobytes()
    assert _raw(p, "ids") == sd["ids"].numpy().tobytes()


def test_same_shape_replacement_patches_only_those_bytes(st_file, tmp_path):
    p, sd = st_file
    new = sd["x.down.weight"].clone()
    new[0] = 0
    dst = str(tmp_path / "out.safetensors")
    write_replaced(read_header(p), dst, {"x.down.weight": new})
    a, b = Path(p).read_bytes(), Path(dst).read_bytes()
    assert len(a) == len(b)
    h = read_header(p)
    lo = h.data_start + h.tensors["x.down.weight"].begin
    hi = h.data_start + h.tensors["x.down.weight"].end
    assert a[:lo] == b[:lo] and a[hi:] == b[hi:]  # header and every other tensor: same bytes
    assert a[lo:hi] != b[lo:hi]
    got = load_file(dst)
    assert torch.equal(got["x.down.weight"], new)


def test_shape_change_rebuilds_and_keeps_other_bytes(st_file, tmp_path):
    p, sd = st_file
    dst = str(tmp_path / "small.safetensors")
    repl = {
        "x.down.weight": sd["x.down.weight"][:2].clone(),
        "x.down.bias": sd["x.down.bias"][:2].clone(),
        "x.up.weight": sd["x.up.weight"][:, :2].clone(),
    }
    write_replaced(read_header(p), dst, repl)
    got = load_file(dst)
    for k, v in sd.items():
        assert torch.equal(got[k], repl.get(k, v)), k
        if k not in repl:
            assert _raw(dst, k) == _raw(p, k)
    with safe_open(dst, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
    assert read_header(dst).data_start % 8 == 0


def test_dtype_change_refused(st_file, tmp_path):
    p, sd = st_file
    with pytest.raises(TypeError, match="x.up.weight"):
        write_replaced(read_header(p), str(tmp_path / "o"), {"x.up.weight": sd["x.up.weight"].double()})


def test_truncated_file(st_file, tmp_path):
    p, _ = st_file
    data = Path(p).read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 10])
    with pytest.raises(CorruptFileError, match="cut.safetensors.*outside the file"):
        read_header(str(bad))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptFileError, match="too short"):
        read_header(str(short))


def test_garbage_header(tmp_path):
    bad = tmp_path / "g.safetensors"
    body = b"{not json"
    bad.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        read_header(str(bad))
    huge = tmp_path / "h.safetensors"
    huge.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptFileError, match="header length"):
        read_header(str(huge))


def test_size_mismatch_in_header(tmp_path):
    hdr = json.dumps({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "m.safetensors"
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 8)
    with pytest.raises(CorruptFileError, match="8 bytes for shape"):
        read_header(str(p))
    assert os.path.getsize(p) > 0


def _craft(path, items: list[tuple[str, str, list[int], bytes]], pad: int = 0) -> None:
    """A safetensors file with the tensors in the given order (no alignment but ``pad`` spaces)."""
    hdr, off = {}, 0
    for name, dt, shape, raw in items:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    text = json.dumps(hdr).encode() + b" " * pad
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(r for *_, r in items))


def test_read_tensors_matches_safe_open_and_reads_only_what_is_asked(st_file, monkeypatch):
    p, sd = st_file
    from tropfast.fleet import stio

    runs = []
    real = stio._read_run
    monkeypatch.setattr(stio, "_read_run", lambda f, pos, n, path: runs.append((pos, n)) or real(f, pos, n, path))
    h = read_header(p)
    got = read_tensors(h, list(sd))
    assert len(runs) == 1  # every tensor of the file: one read
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    runs.clear()
    some = read_tensors(h, ["x.up.weight", "h.bf16"])
    assert set(some) == {"x.up.weight", "h.bf16"} and torch.equal(some["h.bf16"], sd["h.bf16"])
    want = sorted((h.data_start + h.tensors[k].begin, h.tensors[k].nbytes) for k in some)
    if want[0][0] + want[0][1] == want[1][0]:
        assert runs == [(want[0][0], want[0][1] + want[1][1])]
    else:
        assert sorted(runs) == want  # apart in the file: one read each, nothing between
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        read_tensors(h, ["nope"])


def test_read_tensors_copies_misaligned_tensors_and_reads_empty_ones(tmp_path):
    p = str(tmp_path / "odd.safetensors")
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5
    d = torch.tensor([1.5, -2.25], dtype=torch.float64)
    b = torch.tensor([[True, False, True]])
    h16 = torch.tensor([0.5, -1.0, 3.0], dtype=torch.bfloat16)
    items = [
        ("u", "U8", [3], bytes([7, 8, 9])),  # the next tensors start at odd offsets
        ("a", "F32", [2, 3], a.numpy().tobytes()),
        ("empty", "F32", [0, 4], b""),
        ("d", "F64", [2], d.numpy().tobytes()),
        ("b", "BOOL", [1, 3], b.numpy().tobytes()),
        ("h", "BF16", [3], h16.view(torch.int16).numpy().tobytes()),
    ]
    _craft(p, items, pad=1)
    h = read_header(p)
    got = read_tensors(h, ["a", "empty", "d", "b", "h", "u"])
    assert torch.equal(got["a"], a) and torch.equal(got["d"], d) and torch.equal(got["b"], b)
    assert torch.equal(got["h"], h16) and got["u"].tolist() == [7, 8, 9]
    assert got["empty"].shape == (0, 4) and got["empty"].dtype == torch.float32
    for k in ("a", "d", "h"):
        assert got[k].data_ptr() % got[k].element_size() == 0, k  # usable by vectorized kernels
    got["a"][0, 0] = 99.0  # each tensor is the reader's own memory, not the file's
    assert torch.equal(read_tensors(h, ["a"])["a"], a)


def test_read_tensors_names_a_file_cut_after_its_header_was_read(st_file, tmp_path):
    p, sd = st_file
    h = read_header(p)
    data = Path(p).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data)
    h.path = str(cut)
    cut.write_bytes(data[: len(data) - 5])
    last = max(h.tensors, key=lambda k: h.tensors[k].end)
    with pytest.raises(CorruptFileError, match=r"cut.safetensors: ended early"):
        read_tensors(h, [last])
    os.remove(cut)
    with pytest.raises(CorruptFileError, match="cut.safetensors: cannot read"):
        read_tensors(h, [last])


def _patched_reference(p: str, dst: str, repl: dict) -> bytes:
    """The source's bytes with the replaced ranges overwritten: what write_replaced must give."""
    h = read_header(p)
    data = bytearray(Path(p).read_bytes())
    for k, t in repl.items():
        info = h.tensors[k]
        data[h.data_start + info.begin : h.data_start + info.end] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return bytes(data)


def test_replacing_most_of_a_file_streams_it_and_keeps_every_other_byte(st_file, tmp_path, monkeypatch):
    import shutil as _shutil

    p, sd = st_file
    h = read_header(p)
    g = torch.Generator().manual_seed(3)
    # everything but the bias and the ids: well over half of the data
    repl = {k: torch.randn(sd[k].shape, generator=g).to(sd[k].dtype) for k in ("backbone.big", "x.down.weight", "x.up.weight", "h.bf16")}
    assert 2 * sum(h.tensors[k].nbytes for k in repl) >= h.file_size - h.data_start
    copied = []
    monkeypatch.setattr(_shutil, "copyfile", lambda *a, **k: copied.append(a))
    dst = str(tmp_path / "streamed.safetensors")
    assert write_replaced(h, dst, repl) == h.file_size
    assert not copied  # one pass, no whole-file copy first
    assert Path(dst).read_bytes() == _patched_reference(p, dst, repl)
    # kept tensors before, between and after the replaced ones, and padding after the header
    q = str(tmp_path / "order.safetensors")
    w = [torch.randn(5, 3, generator=g) for _ in range(2)]
    items = [("head", "I8", [3], bytes([1, 2, 3])), ("w0", "F32", [5, 3], w[0].numpy().tobytes()),
             ("mid", "U8", [2], bytes([4, 5])), ("w1", "F32", [5, 3], w[1].numpy().tobytes()),
             ("tail", "U8", [3], bytes([6, 7, 8]))]
    _craft(q, items, pad=5)
    repl = {"w0": w[0] * 3, "w1": -w[1]}
    dst = str(tmp_path / "order-out.safetensors")
    write_replaced(read_header(q), dst, repl)
    assert not copied and Path(dst).read_bytes() == _patched_reference(q, dst, repl)


def test_replacing_a_small_part_copies_then_patches(st_file, tmp_path):
    p, sd = st_file
    h = read_header(p)
    repl = {"x.down.bias": sd["x.down.bias"] * 2}
    assert 2 * h.tensors["x.down.bias"].nbytes < h.file_size - h.data_start
    dst = str(tmp_path / "patched.safetensors")
    write_replaced(h, dst, repl)
    assert Path(dst).read_bytes() == _patched_reference(p, dst, repl)


def test_overlapping_tensors_are_patched_in_place_not_streamed(tmp_path):
    # two names over the same bytes (a malformed, aliasing file): the result is the copy
    # patched in the order given, never a stream that would write the shared bytes twice
    p = str(tmp_path / "alias.safetensors")
    raw = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    hdr = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    text = json.dumps(hdr).encode()
    Path(p).write_bytes(len(text).to_bytes(8, "little") + text + raw)
    repl = {"a": torch.full((4,), 1.0), "b": torch.full((4,), 2.0)}
    dst = str(tmp_path / "o.safetensors")
    write_replaced(read_header(p), dst, repl)
    assert Path(dst).read_bytes() == _patched_reference(p, dst, repl)
    assert os.path.getsize(dst) == os.path.getsize(p)
