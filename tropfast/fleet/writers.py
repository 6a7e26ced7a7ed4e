"""Write a pruned source under out/, in the format it came in, atomically.

* ``adapterhub``: every file of the folder is copied, the weights file is rewritten
  (``pytorch_adapter.bin`` with ``torch.save``, ``adapter.safetensors`` through ``stio``),
  so stock ``model.load_adapter(out/NAME)`` loads it.
* ``safetensors`` / ``torch``: the file, with the adapter tensors replaced; in a
  safetensors file every other tensor (and, unless shapes change, the header) keeps its bytes.
* ``checkpoint``: every file copied, the shards that hold adapter tensors rewritten.

Structured pruning writes the physically smaller bottleneck.  Where AdapterHub's config
fixes the bottleneck size (an adapter folder, or a checkpoint whose config.json lists its
adapters) this follows ``export_adapter``: adapters sharing a layer are padded with zero
units to the larger of them, a layer keeps at least one unit, and ``reduction_factor``
becomes one number or a per-layer mapping.  A plain state dict just gets smaller tensors.

Everything is written into a temporary name next to the target and renamed into place,
so a killed run leaves either the old state or the complete output, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

import torch
from torch import Tensor

from ..pruning.export import reduction_factor_for, swap_in
from .sources import HUB_CONFIG, SourceIndex, _checkpoint_index
from .stio import write_replaced

__all__ = ["TMP_MARK", "StaleTemps", "write_output"]

TMP_MARK = ".tmp-prune-saved-"


def _tmp_for(dest: str, is_dir: bool) -> str:
    parent, base = os.path.dirname(dest), os.path.basename(dest)
    os.makedirs(parent, exist_ok=True)
    if is_dir:
        return tempfile.mkdtemp(prefix=f".{base}{TMP_MARK}", dir=parent)
    fd, p = tempfile.mkstemp(prefix=f".{base}{TMP_MARK}", dir=parent)
    os.close(fd)
    return p


class StaleTemps:
    """The temporaries a killed run left beside the outputs (only names this module makes),
    removed before each output is written again.

    Each folder is listed once, at its first output, not once per output: with N outputs in
    one folder that was N listings of N names (44 s of a run's time for 10 000 outputs).
    Temporaries of the current run are made after the listing and are never in it.  Safe to
    share between the writing threads.
    """

    def __init__(self) -> None:
        self._left: dict[str, dict[str, list[str]]] = {}
        self._lock = threading.Lock()

    def clean(self, dest: str) -> None:
        parent, base = os.path.dirname(dest), os.path.basename(dest)
        with self._lock:
            if parent not in self._left:
                self._left[parent] = _leftovers(parent)
            names = self._left[parent].pop(base, [])
        for name in names:
            p = os.path.join(parent, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.remove(p)
                except OSError:  # gone already (listed under another candidate name), or not ours to fix
                    pass


def _leftovers(parent: str) -> dict[str, list[str]]:
    """Temporary names in ``parent`` by the output they were made for: ``.{base}{TMP_MARK}...``.
    A name holding the mark more than once is listed under each base it may belong to."""
    out: dict[str, list[str]] = {}
    if not os.path.isdir(parent):
        return out
    for name in os.listdir(parent):
        if not name.startswith("."):
            continue
        i = name.find(TMP_MARK, 1)
        while i >= 1:
            out.setdefault(name[1:i], []).append(name)
            i = name.find(TMP_MARK, i + 1)
    return out


def _replace(tmp: str, dest: str) -> None:
    if not os.path.isdir(dest) or os.path.islink(dest):  # nothing to swap out: one rename
        os.replace(tmp, dest)
        return
    # the old folder's name carries TMP_MARK, so a later run's StaleTemps finds it if removing it fails
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}{TMP_MARK}old-", dir=os.path.dirname(dest))
    os.rmdir(old)
    if swap_in(tmp, dest, old):
        shutil.rmtree(old, ignore_errors=True)


def _pad_rows(x: Tensor, n: int) -> Tensor:
    return x if x.shape[0] >= n else torch.cat([x, x.new_zeros((n - x.shape[0],) + tuple(x.shape[1:]))], 0)


def _pad_cols(x: Tensor, n: int) -> Tensor:
    return x if x.shape[1] >= n else torch.cat([x, x.new_zeros((x.shape[0], n - x.shape[1]))], 1)


def _hub_configs(index: SourceIndex) -> dict[str | None, dict]:
    """AdapterHub adapter name -> its bottleneck config dict (the live object inside hub_meta)."""
    meta = index.hub_meta or {}
    if index.spec.kind == "adapterhub":
        return {e.hub: meta["config"] for e in index.adapters}
    ad = meta.get("adapters") if isinstance(meta.get("adapters"), dict) else None
    if not ad:
        return {}
    amap, cmap = ad.get("adapters") or {}, ad.get("config_map") or {}
    return {
        e.hub: cmap[amap[e.hub]] for e in index.adapters if e.hub in amap and isinstance(cmap.get(amap[e.hub]), dict)
    }


def _structured_hub(index: SourceIndex, new: dict[str, Tensor], units: list[int]) -> bool:
    """Pad per layer and set reduction_factor (in index.hub_meta) as export_adapter does; True if changed."""
    cfgs = _hub_configs(index)
    if not cfgs:
        return False
    meta = index.hub_meta
    hidden_default = meta.get("hidden_size")
    changed = False
    for hub, cfg in cfgs.items():
        ents = [(e, u) for e, u in zip(index.adapters, units) if e.hub == hub]
        if not ents:
            continue
        sizes: dict = {}
        for e, u in ents:
            sizes[e.layer] = max(sizes.get(e.layer, 1), int(u), 1)
        hidden = int(hidden_default or ents[0][0].d_in)
        rf0 = cfg.get("reduction_factor")
        default_rf = rf0.get("default") if isinstance(rf0, dict) else rf0

        def expected(layer, rf0=rf0, hidden=hidden):
            rf = rf0.get(str(layer), rf0.get("default")) if isinstance(rf0, dict) else rf0
            return max(1, int(hidden // rf)) if rf else None

        stale = any(expected(e.layer) != sizes[e.layer] or int(u) != sizes[e.layer] for e, u in ents)
        if not stale:
            continue
        for e, _ in ents:
            n = sizes[e.layer]
            new[e.down_key] = _pad_rows(new[e.down_key], n)
            if e.down_bias_key is not None:
                new[e.down_bias_key] = _pad_rows(new[e.down_bias_key], n)
            new[e.up_key] = _pad_cols(new[e.up_key], n)
        if len(set(sizes.values())) == 1:
            new_rf = reduction_factor_for(hidden, next(iter(sizes.values())))
        else:
            new_rf = {
                str(layer): reduction_factor_for(hidden, n)
                for layer, n in sorted(sizes.items(), key=lambda kv: (kv[0] is None, kv[0]))
            }
            new_rf["default"] = (
                default_rf if default_rf is not None else reduction_factor_for(hidden, max(sizes.values()))
            )
        cfg["reduction_factor"] = new_rf
        changed = True
    return changed


def _copy_tree(src: str, dst: str, skip: set[str]) -> None:
    """Copy every file under src into dst except the absolute paths in skip (metadata kept)."""
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(root, src)
        troot = dst if rel == "." else os.path.join(dst, rel)
        os.makedirs(troot, exist_ok=True)
        for f in sorted(files):
            p = os.path.join(root, f)
            if p in skip:
                continue
            shutil.copy2(p, os.path.join(troot, f))


def _write_weights(index: SourceIndex, file: str, dst: str, repl: dict[str, Tensor]) -> int:
    if index.fmt == "torch":
        sd = {k: repl.get(k, v) for k, v in index.state.items()}
        torch.save(sd, dst)
        return os.path.getsize(dst)
    return write_replaced(index.headers[file], dst, repl)


def write_output(index: SourceIndex, dest: str, new: dict[str, Tensor], units: list[int] | None) -> int:
    """Write ``index``'s source to ``dest`` with tensors ``new`` (name -> tensor); returns bytes written.

    units: structured pruning's kept units per adapter (index order), else None.
    """
    spec = index.spec
    by_file: dict[str, dict[str, Tensor]] = {}
    owner = {k: f for e in index.adapters for k, f in e.files.items()}
    hub_changed = False
    if units is not None:
        new = dict(new)
        hub_changed = _structured_hub(index, new, units)
    for k, t in new.items():
        by_file.setdefault(owner[k], {})[k] = t.detach().to("cpu").contiguous()
    if spec.kind in ("safetensors", "torch"):
        tmp = _tmp_for(dest, is_dir=False)
        try:
            n = _write_weights(index, spec.path, tmp, by_file.get(spec.path, {}))
            _replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return n
    tmp = _tmp_for(dest, is_dir=True)
    try:
        rewritten = set(by_file)
        cfg_file = None
        idx_file = None
        if spec.kind == "adapterhub" and (hub_changed or units is not None):
            cfg_file = os.path.join(spec.path, HUB_CONFIG)
        if spec.kind == "checkpoint" and hub_changed:
            cfg_file = os.path.join(spec.path, "config.json")
        if spec.kind == "checkpoint" and units is not None:
            idx_file = _checkpoint_index(spec.path)
        skip = rewritten | {f for f in (cfg_file, idx_file) if f}
        _copy_tree(spec.path, tmp, skip)
        delta = 0
        for f, repl in by_file.items():
            out_f = os.path.join(tmp, os.path.relpath(f, spec.path))
            _write_weights(index, f, out_f, repl)
            if index.fmt == "safetensors":
                h = index.headers[f]
                delta += sum(t.numel() * t.element_size() - h.tensors[k].nbytes for k, t in repl.items())
        if cfg_file is not None:
            meta = index.hub_meta
            if spec.kind == "adapterhub":
                meta["tropfast"] = {"units": {e.name: int(u) for e, u in zip(index.adapters, units)}}
            with open(os.path.join(tmp, os.path.basename(cfg_file)), "w") as fh:
                json.dump(meta, fh, indent=2, sort_keys=True)
                if spec.kind == "checkpoint":
                    fh.write("\n")
        if idx_file is not None:
            with open(idx_file) as fh:
                imeta = json.load(fh)
            md = imeta.get("metadata")
            if isinstance(md, dict) and isinstance(md.get("total_size"), int):
                md["total_size"] += delta
            with open(os.path.join(tmp, os.path.basename(idx_file)), "w") as fh:
                json.dump(imeta, fh, indent=2, sort_keys=True)
                fh.write("\n")
        total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total
