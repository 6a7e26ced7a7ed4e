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

Writes are atomic: a temporary file or directory next to the target, then ``os.replace``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch
from torch import Tensor, nn

from . import masks as _masks
from .discovery import AdapterInfo, find_adapters

__all__ = ["export_adapter", "load_sparse_adapter", "reduction_factor_for", "SPARSE_FORMAT"]

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


def _replace_dir(tmp: str, path: str) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    if os.path.isdir(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(path))
        os.rmdir(old)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


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
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp.", dir=parent)
    try:
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
                sd[key] = w.masked_fill(~m, 0)
        if sd is not None:
            torch.save(sd, w_path)
        meta.setdefault("tropfast", {})
        meta["tropfast"] = {"units": {i.name: int(i.down.out_features) for i in infos}}
        with open(cfg_path, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
                v = v.masked_fill(~masks_by_key[k].to("cpu"), 0)
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
    path = os.path.abspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SPARSE_FILENAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_file(out, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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


def load_sparse_adapter(model: nn.Module, path: str | os.PathLike, *, keep_masks: bool = False, strict: bool = True) -> list[str]:
    """Write an adapter saved with ``export_adapter(..., format="sparse")`` into ``model``.

    The model must already hold the adapter (same names); bottleneck Linear layers larger
    than the file's are shrunk to its size.  keep_masks: attach masks so that fine-tuning
    keeps the stored zeros.  strict: every tensor in the file must exist in the model.
    Returns the names of the tensors written.  Nothing is written if any check fails.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SPARSE_FILENAME)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SPARSE_FORMAT:
            raise ValueError(f"{path} is not a tropfast sparse adapter file (format={meta.get('format')!r})")
        shapes = json.loads(meta["shapes"])
        sparse = set(json.loads(meta["sparse"]))
        raw = {k: f.get_tensor(k) for k in f.keys()}
    dense: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        if key in sparse:
            vals, idx = raw[f"{key}:values"], raw[f"{key}:indices"].long()
            n = math.prod(shape)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{path}: indices of {key} fall outside its shape {shape}")
            flat = vals.new_zeros(n)
            flat[idx] = vals
            dense[key] = flat.view(shape)
        else:
            dense[key] = raw[key]
    # Resolve every target first (no writes).
    plan = []
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
        if cur.shape != value.shape and not (isinstance(owner, nn.Linear) and attr in ("weight", "bias")):
            raise ValueError(f"{key}: the file holds shape {tuple(value.shape)}, the model {tuple(cur.shape)}")
        if not torch.isfinite(value).all() and value.is_floating_point():
            raise ValueError(f"{key} in {path} has non-finite values")
        plan.append((key, owner, attr, cur, value))
    for key, owner, attr, cur, value in plan:
        if cur.shape != value.shape:
            _masks._detach(owner)
            setattr(owner, attr, nn.Parameter(value.to(cur.dtype).to(cur.device), requires_grad=cur.requires_grad))
        else:
            with torch.no_grad():
                cur.copy_(value.to(cur.dtype))
    for _, owner, attr, _, _ in plan:
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = owner.weight.shape
    units = json.loads(meta.get("units", "{}"))
    for mname, n in units.items():
        try:
            mod = model.get_submodule(mname)
        except AttributeError:
            continue
        if hasattr(mod, "down_sample"):
            mod.down_sample = int(n)
    if keep_masks:
        for key, owner, attr, _, value in plan:
            if key in sparse:
                _masks.attach_mask(owner, value != 0)
    return [p[0] for p in plan]
