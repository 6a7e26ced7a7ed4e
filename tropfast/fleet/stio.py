"""Raw safetensors I/O: read a header, write a file with some tensors replaced.

Writing goes through the bytes of the source file rather than ``safetensors.torch``, so
that tensors nobody touched (the backbone of a checkpoint) are never loaded into memory
and stay byte-identical: when every replaced tensor keeps its shape the source file is
copied and only those byte ranges are overwritten (the header is untouched); when shapes
change (structured pruning) a new header is written and every other tensor's bytes are
streamed over unchanged, in the source's order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import CorruptFileError

__all__ = [
    "ST_DTYPES",
    "CorruptFileError",
    "Header",
    "TensorInfo",
    "read_header",
    "read_tensors",
    "tensor_bytes",
    "write_replaced",
]

# safetensors dtype name -> (torch dtype or None, bytes per element)
ST_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U16": (getattr(torch, "uint16", None), 2),
    "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "C64": (getattr(torch, "complex64", None), 8),
}
_TORCH_TO_ST = {dt: name for name, (dt, _) in ST_DTYPES.items() if dt is not None}
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
_CHUNK = 16 * 1024 * 1024


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    path: str
    data_start: int  # 8 + header length
    file_size: int
    metadata: dict | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


def read_header(path: str) -> Header:
    """The parsed and checked header of a .safetensors file (reads only the header bytes)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{path}: {size} bytes is too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise CorruptFileError(
                    f"{path}: header length {n} does not fit the file's {size} bytes (truncated or not safetensors)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: the header is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: the header is not a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise CorruptFileError(f"{path}: __metadata__ is not an object")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, t in obj.items():
        try:
            dtype, shape, (b, e) = t["dtype"], tuple(int(s) for s in t["shape"]), t["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path}: malformed header entry for tensor {name!r}") from exc
        if dtype not in ST_DTYPES:
            raise CorruptFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape) or not 0 <= b <= e <= data_len:
            raise CorruptFileError(
                f"{path}: tensor {name!r} lies outside the file (offsets {b}..{e} of {data_len} data bytes; truncated?)"
            )
        if e - b != math.prod(shape) * ST_DTYPES[dtype][1]:
            raise CorruptFileError(f"{path}: tensor {name!r} has {e - b} bytes for shape {list(shape)} of {dtype}")
        tensors[name] = TensorInfo(dtype, shape, b, e)
    return Header(path, 8 + n, size, meta, tensors)


def _runs(infos: list[tuple[str, TensorInfo]]) -> list[list[tuple[str, TensorInfo]]]:
    """The tensors (sorted by offset) grouped into runs that lie back to back in the file."""
    runs: list[list[tuple[str, TensorInfo]]] = []
    for name, info in infos:
        if runs and runs[-1][-1][1].end == info.begin:
            runs[-1].append((name, info))
        else:
            runs.append([(name, info)])
    return runs


def _read_run(f, pos: int, n: int, path: str) -> Tensor:
    """``n`` bytes of the open file ``f`` from ``pos``, as a uint8 tensor (one read)."""
    buf = torch.empty(n, dtype=torch.uint8)
    f.seek(pos)
    got = f.readinto(memoryview(buf.numpy())) if n else 0
    if got != n:
        raise CorruptFileError(f"{path}: ended early ({got} of {n} bytes at offset {pos})")
    return buf


def read_tensors(header: Header, names: list[str]) -> dict[str, Tensor]:
    """The tensors ``names`` of ``header``'s file, read with plain file reads: one read per run of
    tensors that lie back to back (all of an adapter file's tensors are one run), each tensor a
    view of its run's buffer (a copy where its offset does not suit its dtype's alignment).
    Bytes of other tensors (a checkpoint's backbone) are never read.
    """
    infos = []
    for name in names:
        info = header.tensors.get(name)
        if info is None:
            raise KeyError(f"{header.path} holds no tensor {name!r}")
        dt = ST_DTYPES[info.dtype][0]
        if dt is None:
            raise CorruptFileError(f"{header.path}: tensor {name!r} has dtype {info.dtype}, which this torch lacks")
        infos.append((name, info))
    infos.sort(key=lambda kv: (kv[1].begin, kv[1].end))
    out: dict[str, Tensor] = {}
    try:
        with open(header.path, "rb") as f:
            for run in _runs(infos):
                b0 = run[0][1].begin
                buf = _read_run(f, header.data_start + b0, run[-1][1].end - b0, header.path)
                for name, info in run:
                    dt = ST_DTYPES[info.dtype][0]
                    raw = buf[info.begin - b0 : info.end - b0]
                    if (info.begin - b0) % ST_DTYPES[info.dtype][1]:
                        raw = raw.clone()  # misaligned in the buffer for its dtype: a copy of its own
                    out[name] = raw.view(dt).view(info.shape)
    except OSError as e:
        raise CorruptFileError(f"{header.path}: cannot read ({e.strerror or e})") from e
    return out


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def tensor_bytes(t: Tensor) -> memoryview:
    """The little-endian bytes of a tensor, as safetensors stores them (no copy when contiguous on CPU)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def _copy_range(src, dst, begin: int, length: int) -> None:
    src.seek(begin)
    left = length
    while left > 0:
        buf = src.read(min(_CHUNK, left))
        if not buf:
            raise CorruptFileError(f"{src.name}: ended early")
        dst.write(buf)
        left -= len(buf)


def write_replaced(header: Header, dst: str, replace: dict[str, Tensor]) -> int:
    """Write ``header.path`` to ``dst`` with the tensors in ``replace`` swapped in; returns bytes written.

    Every other tensor keeps its bytes.  Dtypes must stay; shapes may change.
    """
    for name, t in replace.items():
        info = header.tensors.get(name)
        if info is None:
            raise KeyError(f"{header.path} holds no tensor {name!r}")
        if st_dtype(t.dtype) != info.dtype:
            raise TypeError(f"{name}: replacement is {t.dtype}, the file holds {info.dtype}")
    same = all(tuple(t.shape) == header.tensors[n].shape for n, t in replace.items())
    spans = sorted((header.tensors[n].begin, header.tensors[n].end, n) for n in replace)
    apart = all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    if same and apart and 2 * sum(e - b for b, e, _ in spans) >= header.file_size - header.data_start:
        # most of the data is replaced (an adapter file): one pass, the source's bytes between
        # the replaced ranges (its header included) copied, rather than a copy then overwrites
        with open(header.path, "rb") as src, open(dst, "wb") as out:
            pos = 0
            for b, e, name in spans:
                _copy_range(src, out, pos, header.data_start + b - pos)
                out.write(tensor_bytes(replace[name]))
                pos = header.data_start + e
            _copy_range(src, out, pos, header.file_size - pos)
        return header.file_size
    if same:
        shutil.copyfile(header.path, dst)
        with open(dst, "r+b") as f:
            for name, t in replace.items():
                f.seek(header.data_start + header.tensors[name].begin)
                f.write(tensor_bytes(t))
        return header.file_size
    order = sorted(header.tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    new: dict = {}
    if header.metadata is not None:
        new["__metadata__"] = header.metadata
    off = 0
    for name, info in order:
        if name in replace:
            t = replace[name]
            shape, nbytes = list(t.shape), t.numel() * t.element_size()
        else:
            shape, nbytes = list(info.shape), info.nbytes
        new[name] = {"dtype": info.dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    text = json.dumps(new, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-aligned, as safetensors writes it
    with open(header.path, "rb") as src, open(dst, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for name, info in order:
            if name in replace:
                out.write(tensor_bytes(replace[name]))
            else:
                _copy_range(src, out, header.data_start + info.begin, info.nbytes)
    return 8 + len(text) + off
