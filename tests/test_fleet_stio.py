"""Raw safetensors reading and writing (tropfast.fleet.stio)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tropfast.fleet.stio import CorruptFileError, read_header, write_replaced


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
