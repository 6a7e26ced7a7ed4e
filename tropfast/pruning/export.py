"""Save pruned adapters: the stock AdapterHub format, or a compact sparse safetensors file.

``format="adapters"`` writes what ``model.save_adapter`` writes, so a stock ``adapters``
model loads it with ``model.load_adapter(path)`` and computes the same outputs.  After
structured pruning the bottleneck is smaller, so ``reduction_factor`` in the saved config
changes: one number when every layer has the same new size, otherwise AdapterHub's
per-layer mapping ``{"0": rf0, "1": rf1, ..., "default": rf}``.  Adapters sharing a layer
(``mh_adapter`` and ``output_adapter``) share one reduction factor, so the smaller of the
two is padded with zero rows of ``adapter_down`` (and zero bias entries) and zero columns
of ``adapter_up`` up to the larger: a zero unit contributes exactly nothing.  A layer
whose units were all removed is saved with one zero unit (AdapterHub's minimum).

``format="sparse"`` writes one safetensors file: for every bottleneck weight its nonzero
values and their flat row-major indices, every other adapter tensor (biases, LayerNorms,
head) dense, and the shapes in the metadata.  ``load_sparse_adapter`` writes it back into a
model that has the adapter (shrinking its Linear layers when the file's bottleneck is
smaller).

Writes are atomic and touch nothing else: the export is built in a hidden temporary next to
the destination and renamed into place.  A destination that exists is replaced only if it
is an earlier export of the same adapter (a folder holding only what ``save_adapter``
writes, or a tropfast sparse file), anything else is refused before any work; a symlinked
destination is written through (the link stays).  Files and folders get the usual modes
(0o666 / 0o777 less the umask).  ``load_sparse_adapter`` checks the whole file against its
metadata and the model before it writes anything.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import stat
from typing import Callable

import torch
from torch import Tensor, nn

from . import masks as _masks
from .discovery import AdapterInfo, find_adapters

__all__ = [
    "SPARSE_FORMAT",
    "atomic_write_file",
    "atomic_write_text",
    "check_export_destination",
    "check_output_file",
    "export_adapter",
    "load_sparse_adapter",
    "reduction_factor_for",
]

SPARSE_FORMAT = "tropfast.sparse"
SPARSE_VERSION = "1"
SPARSE_FILENAME = "adapter_sparse.safetensors"


def reduction_factor_for(hidden: int, units: int) -> float | int:
    """A reduction factor rf with int(hidden // rf) == units (AdapterHub's rule)."""
    if units < 1:
        raise ValueError("an AdapterHub adapter has at least one unit")
    if hidden % units == 0:
        return hidden // units
    rf = hidden / units
    for _ in range(64):
        got = int(hidden // rf)
        if got == units:
            return rf
        rf = math.nextafter(rf, 0.0 if got < units else math.inf)
    raise ArithmeticError(f"no reduction factor gives {units} units from hidden size {hidden}")


def _is_hub(model: nn.Module, name: str) -> bool:
    cfg = getattr(model, "adapters_config", None)
    return cfg is not None and hasattr(model, "save_adapter") and name in getattr(cfg, "adapters", {})


# ---------------------------------------------------------------------------------------
# Atomic writes.  Temporaries are hidden siblings of the destination, created with the
# default modes (0o777 / 0o666, less the umask, as ``save_pretrained`` does), and every
# failure removes them.  A destination that is a symlink is written through: the link
# stays and points at the new result.
# ---------------------------------------------------------------------------------------
def _sibling(dest: str, tag: str) -> str:
    d, base = os.path.split(dest)
    return os.path.join(d, f".{base}.{tag}.{secrets.token_hex(4)}")


def _make_dirs(path: str) -> list[str]:
    """os.makedirs(path), returning the folders it created (outermost first)."""
    made: list[str] = []
    p = path
    while p and not os.path.isdir(p):
        made.append(p)
        p = os.path.dirname(p)
        if p == made[-1]:
            break
    for d in reversed(made):
        os.mkdir(d)
    return list(reversed(made))


def _unmake_dirs(made: list[str]) -> None:
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (briefly process-wide)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    """rmtree that retries once after making the folders writable (a read-only earlier export).

    An interruption (Ctrl-C) during the first attempt is re-raised once the folder is gone.
    """
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except BaseException as e:
        first = e
    for root, dirs, _ in os.walk(path):
        for d in [root] + [os.path.join(root, x) for x in dirs]:
            try:
                os.chmod(d, os.stat(d).st_mode | stat.S_IRWXU)
            except OSError:
                pass
    shutil.rmtree(path)
    if not isinstance(first, Exception):
        raise first


def atomic_write_file(dest: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Write one file: ``write(tmp)`` fills a temporary next to ``dest``, which then replaces it.

    On any failure the temporary is removed and ``dest`` is left as it was; missing parent
    folders are created (and removed again on failure).  Returns the path written.
    """
    dest = os.path.realpath(os.fspath(dest))
    if os.path.isdir(dest):
        raise IsADirectoryError(f"{dest} is a directory; give a file name")
    made = _make_dirs(os.path.dirname(dest))
    tmp = _sibling(dest, "tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        # writers that recreate the file (safetensors) make it 0o600: give it the mode of the
        # file it replaces, or the default one
        os.chmod(tmp, stat.S_IMODE(os.stat(dest).st_mode) if os.path.isfile(dest) else 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _unmake_dirs(made)
        raise
    return dest


def atomic_write_text(dest: str | os.PathLike, text: str) -> str:
    """``atomic_write_file`` for a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write_file(dest, write)


def _check_parent(dest: str, what: str) -> None:
    p = os.path.dirname(dest)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise NotADirectoryError(f"{what} {dest}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {dest}: cannot write in {p}")


def check_output_file(dest: str | os.PathLike, what: str = "output") -> str:
    """Refuse, before any work, a file destination that cannot be written: a folder, or under a file."""
    dest = os.path.realpath(os.fspath(dest))
    if os.path.isdir(dest):
        raise IsADirectoryError(f"{what} {dest} is a directory; give a file name")
    _check_parent(dest, what)
    return dest


def check_export_destination(path: str | os.PathLike, adapter_name: str, format: str = "adapters") -> str:
    """Raise now, before any work, if ``export_adapter(model, adapter_name, path, format)`` would refuse ``path``."""
    path = os.path.abspath(os.fspath(path))
    if format == "sparse":
        return _sparse_destination(path, adapter_name)
    dest, _ = _folder_destination(path, adapter_name)
    _check_parent(dest, "export destination")
    return dest


# Files an AdapterHub ``save_adapter`` (and so ``export_adapter``) writes into its folder.
_EXPORT_FILES = frozenset(
    {
        "adapter_config.json",
        "pytorch_adapter.bin",
        "adapter.safetensors",
        "head_config.json",
        "pytorch_model_head.bin",
        "model_head.safetensors",
    }
)


def _is_export_of(folder: str, name: str, entries: list[str]) -> bool:
    """Whether ``folder`` holds an earlier export of adapter ``name`` and nothing else."""
    if "adapter_config.json" not in entries:
        return False
    if any(e not in _EXPORT_FILES or not os.path.isfile(os.path.join(folder, e)) for e in entries):
        return False
    try:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get("name") == name
    except (OSError, ValueError, AttributeError):
        return False


def _inside_cwd(path: str) -> bool:
    cwd = os.path.realpath(os.getcwd())
    return cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep)


def _folder_destination(path: str, name: str) -> tuple[str, bool]:
    """(real destination, whether it replaces an earlier export); refuses anything else that exists."""
    dest = os.path.realpath(path)
    if _inside_cwd(dest):
        raise FileExistsError(f"{path} is the current folder (or holds it); export into a new folder")
    if not os.path.lexists(dest):
        return dest, False
    if not os.path.isdir(dest):
        raise FileExistsError(f"{path} exists and is not a folder")
    entries = sorted(os.listdir(dest))
    if not entries:
        return dest, False
    if not _is_export_of(dest, name, entries):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise FileExistsError(
            f"{path} is not empty ({shown}) and is not an earlier export of adapter {name!r}; "
            "export into a new or empty folder"
        )
    if not os.access(dest, os.W_OK | os.X_OK):
        raise PermissionError(f"{path} is a read-only earlier export of {name!r}; make it writable to replace it")
    return dest, True


def swap_in(tmp: str, dest: str, old: str) -> bool:
    """Rename the finished ``tmp`` (a file or folder) to ``dest``.

    A folder already at ``dest`` is first renamed to ``old`` (a free name beside it) and put
    back if the second rename fails; the caller removes ``old`` then.  Returns whether a
    folder was swapped out.  Every writer of whole folders (export, ``prune_saved``,
    ``placement.save``) goes through here.
    """
    if not os.path.isdir(dest) or os.path.islink(dest):
        os.replace(tmp, dest)
        return False
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    return True


def _install_folder(tmp: str, dest: str, replace: bool) -> None:
    """Move the finished folder ``tmp`` to ``dest``; an earlier export there is swapped out, then removed."""
    if not replace:
        os.replace(tmp, dest)  # a new name, or onto an empty folder: one rename
        return
    old = _sibling(dest, "old")
    swap_in(tmp, dest, old)
    try:
        _remove_tree(old)
    except OSError as e:
        raise OSError(f"exported to {dest}, but the earlier export moved to {old} could not be removed: {e}") from e


def _layer_sizes(infos: list[AdapterInfo]) -> dict[int | None, int]:
    sizes: dict[int | None, int] = {}
    for i in infos:
        sizes[i.layer] = max(sizes.get(i.layer, 1), int(i.down.out_features), 1)
    return sizes


def _pad_rows(x: Tensor, n: int) -> Tensor:
    if x.shape[0] >= n:
        return x
    return torch.cat([x, x.new_zeros((n - x.shape[0],) + tuple(x.shape[1:]))], 0)


def _pad_cols(x: Tensor, n: int) -> Tensor:
    if x.shape[1] >= n:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], n - x.shape[1]))], 1)


def _export_hub(model: nn.Module, name: str, path: str, with_head: bool) -> str:
    infos = find_adapters(model, adapter=name)
    bad = [i for i in infos if not i.supported]
    if bad:
        raise ValueError(f"adapter {name!r} holds unsupported layers ({bad[0].reason})")
    path = os.path.abspath(path)
    dest, replace = _folder_destination(path, name)
    made = _make_dirs(os.path.dirname(dest))
    tmp = _sibling(dest, "tmp")
    try:
        os.mkdir(tmp, 0o777)
        kw = {"with_head": with_head} if hasattr(model, "heads") else {}
        model.save_adapter(tmp, name, **kw)
        cfg_path = os.path.join(tmp, "adapter_config.json")
        w_path = os.path.join(tmp, "pytorch_adapter.bin")
        with open(cfg_path) as f:
            meta = json.load(f)
        hidden = int(meta.get("hidden_size") or infos[0].d_in)
        rf0 = meta["config"]["reduction_factor"]
        default_rf = rf0.get("default", None) if isinstance(rf0, dict) else rf0

        def expected(layer):
            rf = rf0
            if isinstance(rf0, dict):
                rf = rf0.get(str(layer), rf0.get("default"))
            return max(1, int(hidden // rf))

        sizes = _layer_sizes(infos)
        stale = any(expected(i.layer) != sizes[i.layer] or i.down.out_features != sizes[i.layer] for i in infos)
        sd = None
        if stale:
            if len(set(sizes.values())) == 1:
                new_rf = reduction_factor_for(hidden, next(iter(sizes.values())))
            else:
                new_rf = {str(layer): reduction_factor_for(hidden, n) for layer, n in sorted(sizes.items())}
                new_rf["default"] = default_rf if default_rf is not None else reduction_factor_for(hidden, max(sizes.values()))
            meta["config"]["reduction_factor"] = new_rf
            sd = torch.load(w_path, map_location="cpu", weights_only=True)
            for i in infos:
                n = sizes[i.layer]
                for key, fn in (
                    (f"{i.down_name}.weight", _pad_rows),
                    (f"{i.down_name}.bias", _pad_rows),
                    (f"{i.up_name}.weight", _pad_cols),
                ):
                    if key in sd:
                        sd[key] = fn(sd[key], n)
                    elif not key.endswith(".bias"):
                        raise KeyError(f"{key} is missing from the weights saved by save_adapter")
        # Masks are re-applied on the saved copy, whatever the live weights hold now.
        for i in infos:
            for mod, key in ((i.down, f"{i.down_name}.weight"), (i.up, f"{i.up_name}.weight")):
                mask = mod._buffers.get(_masks.MASK_BUFFER)
                if mask is None:
                    continue
                if sd is None:
                    sd = torch.load(w_path, map_location="cpu", weights_only=True)
                w = sd[key]
                m = mask.to("cpu")
                if w.shape != m.shape:
                    m = _pad_cols(m, w.shape[1]) if w.shape[0] == m.shape[0] else _pad_rows(m, w.shape[0])
                sd[key] = _masks.keep_only(w, m)
        if sd is not None:
            torch.save(sd, w_path)
        meta.setdefault("tropfast", {})
        meta["tropfast"] = {"units": {i.name: int(i.down.out_features) for i in infos}}
        with open(cfg_path, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        for fname in os.listdir(tmp):
            _fsync(os.path.join(tmp, fname))
        _install_folder(tmp, dest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _unmake_dirs(made)
        raise
    return path


def _adapter_tensors(model: nn.Module, name: str, with_head: bool) -> tuple[dict[str, Tensor], list[AdapterInfo], bool]:
    hub = _is_hub(model, name)
    infos = find_adapters(model, adapter=name) if hub else find_adapters(model, pattern=name)
    sd = model.state_dict()
    if hub:
        keep = {
            k: v
            for k, v in sd.items()
            if f".adapters.{name}." in k
            or k.startswith(f"invertible_adapters.{name}.")
            or f".invertible_adapters.{name}." in k
            or (with_head and k.startswith(f"heads.{name}."))
        }
    else:
        prefixes = tuple(i.name + "." for i in infos)
        keep = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    return keep, infos, hub


def _export_sparse(model: nn.Module, name: str, path: str, with_head: bool) -> str:
    from safetensors.torch import save_file

    dest = _sparse_destination(path, name)
    tensors_in, infos, hub = _adapter_tensors(model, name, with_head)
    sparse_keys = {f"{i.down_name}.weight" for i in infos} | {f"{i.up_name}.weight" for i in infos}
    masks_by_key = {}
    for i in infos:
        for mod, key in ((i.down, f"{i.down_name}.weight"), (i.up, f"{i.up_name}.weight")):
            if _masks.MASK_BUFFER in mod._buffers:
                masks_by_key[key] = mod._buffers[_masks.MASK_BUFFER]
    out: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for k, v in tensors_in.items():
        v = v.detach().to("cpu")
        shapes[k] = list(v.shape)
        if k in sparse_keys:
            if k in masks_by_key:
                v = _masks.keep_only(v, masks_by_key[k])
            flat = v.reshape(-1)
            idx = flat.nonzero().squeeze(1)
            itype = torch.int32 if flat.numel() < 2**31 else torch.int64
            out[f"{k}:values"] = flat[idx].contiguous()
            out[f"{k}:indices"] = idx.to(itype).contiguous()
        else:
            out[k] = v.contiguous().clone()
    meta = {
        "format": SPARSE_FORMAT,
        "version": SPARSE_VERSION,
        "adapter": name,
        "kind": "adapters" if hub else "module",
        "shapes": json.dumps(shapes),
        "sparse": json.dumps(sorted(sparse_keys)),
        "units": json.dumps({i.name: int(i.down.out_features) for i in infos}),
    }
    if hub:
        cfg = model.adapters_config.get(name)
        meta["adapter_config"] = json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), default=str)
    return atomic_write_file(dest, lambda tmp: save_file(out, tmp, metadata=meta))


def _sparse_meta(path: str) -> dict | None:
    """The metadata of a safetensors file, or None if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def _sparse_destination(path: str, name: str) -> str:
    """The file to write; refuses, before any work, to replace anything but an earlier sparse export of ``name``."""
    dest = os.path.realpath(path)
    if os.path.isdir(dest) or path.endswith(("/", os.sep)):
        dest = os.path.join(dest, SPARSE_FILENAME)
    if os.path.lexists(dest):
        meta = _sparse_meta(dest) if os.path.isfile(dest) else None
        if meta is None or meta.get("format") != SPARSE_FORMAT or meta.get("adapter") != name:
            raise FileExistsError(
                f"{dest} exists and is not an earlier sparse export of adapter {name!r}; export to a new file"
            )
    return check_output_file(dest, "export destination")


def export_adapter(
    model: nn.Module,
    adapter_name: str,
    path: str | os.PathLike,
    format: str = "adapters",
    *,
    with_head: bool = True,
) -> str:
    """Save a (pruned) adapter; returns the path written.

    format="adapters": a directory that stock ``adapters`` loads with ``model.load_adapter``
    (AdapterHub models only).  format="sparse": one safetensors file of nonzero values and
    indices, read back by ``load_sparse_adapter``; ``adapter_name`` is the AdapterHub name,
    or for plain PyTorch adapters the glob pattern that ``find_adapters`` takes.
    with_head: include the AdapterHub prediction head of the same name, if any.

    ``path`` must be new, an empty folder, or an earlier export of the same adapter, which
    is replaced atomically; anything else (a folder holding other files, the current
    folder, an unrelated file) is refused with FileExistsError before any work.
    """
    path = os.fspath(path)
    if format == "adapters":
        if not _is_hub(model, adapter_name):
            raise ValueError(
                f"format='adapters' needs an AdapterHub model holding an adapter named {adapter_name!r}; "
                "use format='sparse' for plain PyTorch adapters"
            )
        return _export_hub(model, adapter_name, path, with_head)
    if format == "sparse":
        return _export_sparse(model, adapter_name, path, with_head)
    raise ValueError(f"format={format!r}; choose 'adapters' or 'sparse'")


_MISSING = object()


def _sparse_header(path: str, meta: dict) -> tuple[dict[str, list[int]], set[str], dict[str, int]]:
    """(shapes, names stored sparse, units) from a sparse file's metadata, every field checked."""
    if meta.get("format") != SPARSE_FORMAT:
        raise ValueError(
            f"{path} is not a tropfast sparse adapter file (its metadata has format={meta.get('format')!r})"
        )
    if meta.get("version") != SPARSE_VERSION:
        raise ValueError(
            f"{path}: sparse format version {meta.get('version')!r} is not supported (only {SPARSE_VERSION})"
        )

    def field(key: str, default=_MISSING):
        if key not in meta:
            if default is not _MISSING:
                return default
            raise ValueError(
                f"{path}: the metadata has no {key!r}; the file is damaged or was not written by export_adapter"
            )
        try:
            return json.loads(meta[key])
        except ValueError as e:
            raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    shapes = field("shapes")
    if not isinstance(shapes, dict) or not all(
        isinstance(v, list) and all(count(d) for d in v) for v in shapes.values()
    ):
        raise ValueError(f"{path}: metadata 'shapes' must map tensor names to lists of sizes")
    sparse = field("sparse")
    if not isinstance(sparse, list) or not all(isinstance(k, str) and k in shapes for k in sparse):
        raise ValueError(f"{path}: metadata 'sparse' must list tensors that 'shapes' describes")
    units = field("units", {})
    if not isinstance(units, dict) or not all(count(v) for v in units.values()):
        raise ValueError(f"{path}: metadata 'units' must map module names to unit counts")
    return shapes, set(sparse), units


def _sparse_tensors(path: str, f, shapes: dict[str, list[int]], sparse: set[str]) -> dict[str, Tensor]:
    """Every tensor of the file, dense, after checking it against the metadata."""
    stored = set(f.keys())
    expected = {x for k in sparse for x in (f"{k}:values", f"{k}:indices")} | (set(shapes) - sparse)
    for k in sorted(expected - stored):
        raise ValueError(f"{path}: tensor {k!r} named in the metadata is missing")
    for k in sorted(stored - expected):
        raise ValueError(f"{path}: tensor {k!r} is not described by the metadata")
    dense: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        n = math.prod(shape)
        if key in sparse:
            vals, idx = f.get_tensor(f"{key}:values"), f.get_tensor(f"{key}:indices")
            if vals.dim() != 1 or idx.dim() != 1 or vals.numel() != idx.numel():
                raise ValueError(f"{path}: {key} has {tuple(vals.shape)} values for {tuple(idx.shape)} indices")
            if not vals.is_floating_point() or idx.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{path}: {key} has {vals.dtype} values and {idx.dtype} indices")
            idx = idx.long()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{path}: indices of {key} fall outside its shape {shape}")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"{path}: indices of {key} are repeated or out of order")
            flat = vals.new_zeros(n)
            flat[idx] = vals
            value = flat.view(shape)
        else:
            value = f.get_tensor(key)
            if list(value.shape) != shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but the metadata says {tuple(shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: {key} has non-finite values")
        dense[key] = value
    return dense


def read_sparse_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor], set[str]]:
    """(metadata, every tensor made dense, the names stored sparse) of a sparse export, checked."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SPARSE_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        f = safe_open(path, framework="pt")
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    with f:
        meta = f.metadata() or {}
        shapes, sparse, _ = _sparse_header(path, meta)
        dense = _sparse_tensors(path, f, shapes, sparse)
    return meta, dense, sparse


def load_sparse_adapter(
    model: nn.Module, path: str | os.PathLike, *, keep_masks: bool = False, strict: bool = True
) -> list[str]:
    """Write an adapter saved with ``export_adapter(..., format="sparse")`` into ``model``.

    The model must already hold the adapter (same names).  The bottleneck may differ in
    size (structured pruning shrinks it): its Linear layers are resized to the file's,
    every other dimension must match.  keep_masks: attach masks so that fine-tuning keeps
    the stored zeros; otherwise masks the model carried on those layers are removed (the
    loaded weights define the adapter).  strict: every tensor in the file must exist in
    the model.  Returns the names of the tensors written.

    Every shape, dtype and index of the file is checked against its metadata and the model
    before the first write; on any mismatch a ValueError names the tensor and the model is
    left unchanged.
    """
    path = os.fspath(path)
    meta, dense, sparse = read_sparse_adapter(path)
    _, _, units = _sparse_header(path, meta)
    name, kind = meta.get("adapter"), meta.get("kind")
    try:
        infos = find_adapters(model, adapter=name) if kind == "adapters" else find_adapters(model, pattern=name)
    except (LookupError, TypeError) as e:
        raise ValueError(f"{path} holds adapter {name!r}, which the model does not have: {e}") from None
    roles: dict[str, tuple[str, AdapterInfo]] = {}
    for i in infos:
        roles[f"{i.down_name}.weight"] = ("down", i)
        roles[f"{i.down_name}.bias"] = ("bias", i)
        roles[f"{i.up_name}.weight"] = ("up", i)
    plan = []
    size: dict[str, int] = {}  # the file's bottleneck size per adapter
    for key, value in dense.items():
        prefix, _, attr = key.rpartition(".")
        try:
            owner = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            owner = None
        cur = getattr(owner, attr, None) if owner is not None else None
        if not isinstance(cur, Tensor):
            if strict:
                raise KeyError(f"{key} from {path} has no counterpart in the model")
            continue
        if cur.is_floating_point() != value.is_floating_point() or (
            not cur.is_floating_point() and cur.dtype != value.dtype
        ):
            raise ValueError(f"{key}: the file holds {value.dtype}, the model {cur.dtype}")
        role, info = roles.get(key, (None, None))
        vs, cs = tuple(value.shape), tuple(cur.shape)
        if role == "down" and len(vs) == 2 and vs[1] == cs[1]:
            k = vs[0]
        elif role == "bias" and len(vs) == 1:
            k = vs[0]
        elif role == "up" and len(vs) == 2 and vs[0] == cs[0]:
            k = vs[1]
        elif vs == cs:
            k = None
        else:
            raise ValueError(f"{key}: the file holds shape {vs}, the model {cs}")
        if k is not None:
            if size.setdefault(info.name, k) != k:
                raise ValueError(
                    f"{path}: the bottleneck of {info.name} has {size[info.name]} units in one tensor, {k} in {key}"
                )
        if value.is_floating_point() and not bool(torch.isfinite(value.to(cur.dtype)).all()):
            raise ValueError(f"{key} in {path} does not fit the model's {cur.dtype}")
        plan.append((key, owner, attr, cur, value))
    written = {p[0] for p in plan}
    for i in infos:
        k = size.get(i.name)
        if k is None or k == i.r:
            continue
        need = [f"{i.down_name}.weight", f"{i.up_name}.weight"]
        if i.down.bias is not None:
            need.append(f"{i.down_name}.bias")
        for key in need:
            if key not in written:
                raise ValueError(f"{path} resizes the bottleneck of {i.name} to {k} units but holds no {key}")
    for mname, n in units.items():
        if mname in size and size[mname] != n:
            raise ValueError(f"{path}: metadata 'units' gives {mname} {n} units, its tensors {size[mname]}")
    # every check passed: write
    for _key, owner, attr, cur, value in plan:
        v = value.to(dtype=cur.dtype, device=cur.device)
        if cur.shape != value.shape:
            setattr(owner, attr, nn.Parameter(v.contiguous(), requires_grad=cur.requires_grad))
        else:
            with torch.no_grad():
                cur.copy_(v)
    for key, owner, attr, _, value in plan:
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = owner.weight.shape
            _masks._detach(owner)  # an earlier mask would zero the loaded weights at the next step
            if keep_masks and key in sparse:
                _masks._attach(owner, value != 0, zero=False, copy=False)
    for mname, n in units.items():
        try:
            mod = model.get_submodule(mname)
        except AttributeError:
            continue
        if hasattr(mod, "down_sample"):
            mod.down_sample = int(n)
    return [p[0] for p in plan]
