"""Install a placement: AdapterHub adapters where AdapterHub expresses them, hooks elsewhere.

Sequential and parallel connections become AdapterHub ``seq_bn`` / ``par_bn`` adapters, one
per (kind, sublayer) group, with ``leave_out`` naming the layers that get none:
``<name>_seq_attn``, ``<name>_seq_ffn``, ``<name>_par_attn``, ``<name>_par_ffn``.  AdapterHub
cannot stack a sequential and a parallel adapter at the same sublayer (its Stack feeds one
into the other), so where a placement holds both, the parallel one is a hook adapter.

Everything else (long-range connections, and all connections when the model is not an
AdapterHub model or ``hub=False``) is a plain ``PlacedAdapter`` module (down Linear, ReLU,
up Linear, times a scaling) kept in the ``ModuleDict`` ``model.tropfast_placement`` under
``<name>_<connection>`` and run by forward hooks:

* source hooks cache the source activation of the current forward (a block output, or a
  sublayer's residual input) and are cleared when the encoder returns;
* a target hook on a sublayer's ``dropout`` adds the adapters' outputs to what goes into the
  residual sum and LayerNorm.  A hook sequential adapter reads ``LayerNorm(h + x)``, the
  sublayer's own output, and adds into the same sum, exactly as AdapterHub's ``seq_bn``
  does; a hook parallel adapter reads the sublayer input x, as ``par_bn`` does.

Every adapter of a placement, AdapterHub or hook, matches the glob ``*.<name>_*``, so
``tropfast.prune(model, pattern=installed.pattern)`` finds them all; ``save`` and ``load``
write and read them (AdapterHub format for the AdapterHub adapters, tropfast's sparse
safetensors for the hook adapters).  Hooks and modules are removed by ``remove``.

Initialisation and scaling follow AdapterHub: sequential adapters as ``SeqBnConfig``
(``init_weights="bert"``, scaling 1), parallel ones as ``ParBnConfig`` (``mam_adapter``: the
up-projection starts at zero, scaling 4).  Long-range adapters, which like parallel ones read
an activation other than the one they add to, follow ``ParBnConfig`` (a design choice).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from ..pruning import masks as _masks
from ..pruning.discovery import find_adapters
from ..pruning.export import export_adapter, load_sparse_adapter, reduction_factor_for, swap_in
from .selection import Placement
from .sites import LOCATIONS, Sites, find_sites

__all__ = [
    "CONTAINER",
    "InstalledPlacement",
    "PlacedAdapter",
    "apply",
    "installed",
    "load",
    "remove",
    "save",
]

CONTAINER = "tropfast_placement"
SAVED_FORMAT = "tropfast.placement.installed"
HOOKS_FILE = "hook_adapters.safetensors"

_DEFAULTS = {
    "seq": {"non_linearity": "relu", "init_weights": "bert", "scaling": 1.0},
    "par": {"non_linearity": "relu", "init_weights": "mam_adapter", "scaling": 4.0},
    "long": {"non_linearity": "relu", "init_weights": "mam_adapter", "scaling": 4.0},
}
_CONFIG_KEYS = ("non_linearity", "init_weights", "scaling")
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU, "silu": nn.SiLU}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


class PlacedAdapter(nn.Module):
    """y = up(act(down(x))) · scaling, added at its target by a hook.  A = down.weight (r, d_in)."""

    def __init__(self, d_in: int, r: int, d_out: int, *, kind: str, connection: str, non_linearity: str = "relu",
                 init_weights: str = "mam_adapter", scaling: float = 1.0):
        super().__init__()
        if non_linearity not in _ACTS:
            raise ValueError(f"non_linearity={non_linearity!r}: hook adapters support {', '.join(_ACTS)}")
        self.down = nn.Linear(d_in, r)
        self.act = _ACTS[non_linearity]()
        self.up = nn.Linear(r, d_out)
        self.scaling = float(scaling)
        self.kind = kind
        self.connection = connection
        with torch.no_grad():
            if init_weights == "bert":
                for lin in (self.down, self.up):
                    lin.weight.normal_(0.0, 0.02)
                    lin.bias.zero_()
            elif init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                self.down.bias.zero_()
                self.up.weight.zero_()
                self.up.bias.zero_()
            else:
                raise ValueError(f"init_weights={init_weights!r}: hook adapters support 'bert' and 'mam_adapter'")

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"connection={self.connection}, scaling={self.scaling:g}"


# Hook objects are plain classes (not closures) so that ``copy.deepcopy(model)`` gives a copy
# whose hooks point at the copy's adapters and cache.
class _Cache:
    def __init__(self):
        self.values: dict[tuple, Tensor] = {}


class _SourceHook:
    def __init__(self, name: str, cache: _Cache, key: tuple):
        self.name, self.cache, self.key = name, cache, key

    def __call__(self, module, args, output):
        self.cache.values[self.key] = output[0] if isinstance(output, (tuple, list)) else output


class _InputHook:
    def __init__(self, name: str, cache: _Cache, key: tuple):
        self.name, self.cache, self.key = name, cache, key

    def __call__(self, module, args, kwargs):
        x = args[1] if len(args) > 1 else kwargs.get("input_tensor")
        if x is None:
            raise RuntimeError(f"{type(module).__name__} was called without its residual input")
        self.cache.values[self.key] = x


class _ClearHook:
    def __init__(self, name: str, cache: _Cache):
        self.name, self.cache = name, cache

    def __call__(self, module, args, output):
        self.cache.values.clear()


class _TargetHook:
    """Adds par / long-range outputs, then a sequential adapter reading LayerNorm(h + x)."""

    def __init__(self, name: str, cache: _Cache, additive: list, seq: nn.Module | None, ln: nn.Module | None,
                 in_key: tuple | None):
        self.name, self.cache, self.additive, self.seq, self.ln, self.in_key = name, cache, additive, seq, ln, in_key

    def _get(self, key):
        v = self.cache.values.get(key)
        if v is None:
            raise RuntimeError(f"placement {self.name!r}: the source {key} was not computed before its target")
        return v

    def __call__(self, module, args, output):
        h = output
        for adapter, key in self.additive:
            h = h + adapter(self._get(key))
        if self.seq is not None:
            h = h + self.seq(self.ln(h + self._get(self.in_key)))
        return h


_HOOK_TYPES = (_SourceHook, _InputHook, _ClearHook, _TargetHook)
_HOOK_FLAG_DICTS = ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _hub_available(model: nn.Module) -> bool:
    return hasattr(model, "add_adapter") and hasattr(model, "adapters_config") and hasattr(model, "set_active_adapters")


def _hub_name(name: str, kind: str, location: str) -> str:
    return f"{name}_{kind}_{location}"


def _kind_config(config: dict | None, kind: str) -> dict:
    out = dict(_DEFAULTS[kind])
    if config:
        for k, v in config.items():
            if k in _DEFAULTS:
                continue
            out[k] = v
        out.update(config.get(kind) or {})
    return out


def _check_config(config: dict | None) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    for k, v in config.items():
        if k in _DEFAULTS:
            if not isinstance(v, dict):
                raise TypeError(f"config[{k!r}] must be a dict of {', '.join(_CONFIG_KEYS)}")
            bad = sorted(set(v) - set(_CONFIG_KEYS))
        else:
            bad = [k] if k not in _CONFIG_KEYS else []
        if bad:
            raise ValueError(f"unknown adapter config key(s) {bad}; known: {', '.join(_CONFIG_KEYS)} "
                             "(at the top level for every kind, or under 'seq', 'par', 'long')")


@dataclass
class InstalledPlacement:
    """A placement installed in a model: its AdapterHub adapters, hook adapters and glob."""

    model: nn.Module = field(repr=False)
    name: str
    placement: Placement
    hub: list[str]  # AdapterHub adapter names, in Stack order
    via: dict[str, str]  # connection id -> "adapters" | "hooks"
    config: dict | None = None

    @property
    def pattern(self) -> str:
        """The glob that ``tropfast.prune`` / ``find_adapters`` take to find every adapter of this placement."""
        return f"*.{self.name}_*"

    @property
    def modules(self) -> dict[str, PlacedAdapter]:
        """Hook adapters by connection id."""
        box = getattr(self.model, CONTAINER, None)
        if box is None:
            return {}
        out = {}
        for c in self.placement.connections:
            key = f"{self.name}_{c.key}"
            if self.via.get(c.id) == "hooks" and key in box:
                out[c.id] = box[key]
        return out

    @property
    def setup(self):
        """The AdapterHub active setup of this placement (a Stack, one name, or None)."""
        if not self.hub:
            return None
        if len(self.hub) == 1:
            return self.hub[0]
        from adapters.composition import Stack

        return Stack(*self.hub)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter of the placement's adapters (AdapterHub and hook)."""
        seen = set()
        for _, p in self.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        hub = tuple(f".adapters.{h}." for h in self.hub)
        box_prefix = f"{CONTAINER}.{self.name}_"
        for n, p in self.model.named_parameters():
            if (hub and any(h in n for h in hub)) or n.startswith(box_prefix):
                yield n, p

    def activate(self, head: str | None = None) -> None:
        """Make the AdapterHub adapters active (hook adapters always are) and, if given, the head."""
        if self.hub:
            self.model.set_active_adapters(self.setup)
        if head is not None:
            self.model.active_head = head

    def train_only(self, head: str | None = None) -> list[nn.Parameter]:
        """Freeze everything but the placement's adapters (and the head ``head``); returns the trainable ones."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = list(self.parameters())
        if head is not None:
            heads = getattr(self.model, "heads", None)
            if heads is None or head not in heads:
                raise KeyError(f"the model has no prediction head {head!r}")
            params += list(heads[head].parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def remove(self) -> None:
        remove(self.model, self.name)

    def save(self, path: str | os.PathLike, *, head: str | None = None) -> str:
        return save(self.model, path, name=self.name, head=head)


def _registry(model: nn.Module) -> dict:
    box = getattr(model, CONTAINER, None)
    return getattr(box, "placements", {}) if box is not None else {}


def installed(model: nn.Module, name: str | None = None) -> InstalledPlacement | list[str]:
    """The names of the placements installed in ``model``, or the handle of the one named ``name``."""
    reg = _registry(model)
    if name is None:
        return sorted(reg)
    if name not in reg:
        have = f" (installed: {', '.join(sorted(reg))})" if reg else ""
        raise KeyError(f"no placement named {name!r} is installed{have}")
    d = reg[name]
    return InstalledPlacement(model, name, Placement.from_dict(d["placement"]), list(d["hub"]), dict(d["via"]),
                              d.get("config"))


def _plan(model: nn.Module, placement: Placement, hub: bool | None) -> dict[str, str]:
    use_hub = _hub_available(model) if hub is None else bool(hub)
    if use_hub and not _hub_available(model):
        raise ValueError("hub=True needs an AdapterHub model (adapters.init(model) or an AutoAdapterModel)")
    via: dict[str, str] = {}
    seq_at = {(c.location, c.layer) for c in placement.connections if c.kind == "seq"}
    for c in placement.connections:
        if not use_hub or c.kind == "long":
            via[c.id] = "hooks"
        elif c.kind == "par" and (c.location, c.layer) in seq_at:
            via[c.id] = "hooks"  # AdapterHub cannot run seq and par at one sublayer
        else:
            via[c.id] = "adapters"
    return via


def _check_fits(sites: Sites, placement: Placement) -> None:
    if placement.n_layers is not None and placement.n_layers != sites.n_layers:
        raise ValueError(f"the placement is for {placement.n_layers} layers; the model has {sites.n_layers}")
    if placement.hidden is not None and placement.hidden != sites.hidden:
        raise ValueError(f"the placement is for hidden size {placement.hidden}; the model has {sites.hidden}")
    for c in placement.connections:
        c.check(sites.n_layers)
        if c.d_in not in (0, sites.hidden) or c.d_out not in (0, sites.hidden):
            raise ValueError(f"connection {c.id} maps {c.d_in} -> {c.d_out}; the model's hidden size is {sites.hidden}")


def _add_hub(
    model: nn.Module, name: str, placement: Placement, via: dict, config: dict | None, sites: Sites, names: list[str]
) -> list[str]:
    from adapters import ParBnConfig, SeqBnConfig


    groups: dict[tuple[str, str], list[int]] = {}
    for c in placement.connections:
        if via[c.id] == "adapters":
            groups.setdefault((c.kind, c.location), []).append(c.layer)
    rf = reduction_factor_for(sites.hidden, placement.r)
    for kind in ("seq", "par"):
        for loc in LOCATIONS:
            layers = groups.get((kind, loc))
            if not layers:
                continue
            hub_name = _hub_name(name, kind, loc)
            kc = _kind_config(config, kind)
            cls = SeqBnConfig if kind == "seq" else ParBnConfig
            cfg = cls(
                mh_adapter=loc == "attn",
                output_adapter=loc == "ffn",
                reduction_factor=rf,
                non_linearity=kc["non_linearity"],
                init_weights=kc["init_weights"],
                scaling=kc["scaling"],
                leave_out=[lay for lay in range(sites.n_layers) if lay not in layers],
            )
            model.add_adapter(hub_name, config=cfg)
            names.append(hub_name)
    return names


def apply(
    model: nn.Module,
    placement: Placement,
    config: dict | None = None,
    *,
    name: str = "placement",
    hub: bool | None = None,
    activate: bool = True,
    head: str | None = None,
    seed: int | None = None,
) -> InstalledPlacement:
    """Install ``placement``'s adapters (width ``placement.r``) in ``model``; returns a handle.

    config: adapter settings ``non_linearity``, ``init_weights`` ("bert" | "mam_adapter"),
    ``scaling``, for every kind at the top level or per kind under "seq" / "par" / "long"
    (defaults: AdapterHub's ``SeqBnConfig`` for seq, ``ParBnConfig`` for par and long-range).
    name: letters and digits; the adapters are ``<name>_seq_ffn``, ..., ``tropfast_placement.<name>_*``.
    hub: True = AdapterHub adapters where expressible (the default for AdapterHub models),
    False = hook adapters only.  activate: make this placement's AdapterHub adapters the model's
    active setup (replacing any other) and ``head`` the active head; hook adapters always run.
    seed: seed the adapters' initialisation.
    Nothing is left behind if anything fails.
    """
    if not isinstance(placement, Placement):
        raise TypeError(f"apply takes a Placement, got {type(placement).__name__}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name={name!r}: use letters and digits only, starting with a letter")
    if not placement.connections:
        raise ValueError("the placement holds no connection: nothing to install")
    _check_config(config)
    sites = find_sites(model)
    _check_fits(sites, placement)
    if name in _registry(model):
        raise ValueError(f"a placement named {name!r} is already installed; remove it first or choose another name")
    via = _plan(model, placement, hub)
    if _hub_available(model):
        taken = [h for h in (_hub_name(name, k, loc) for k in ("seq", "par") for loc in LOCATIONS)
                 if h in getattr(model.adapters_config, "adapters", {})]
        if taken:
            raise ValueError(f"the model already holds AdapterHub adapter(s) {', '.join(taken)}; choose another name")
    if head is not None and head not in (getattr(model, "heads", None) or {}):
        raise KeyError(f"the model has no prediction head {head!r}")
    hub_names: list[str] = []  # filled as AdapterHub adapters are added, so a failure removes exactly those
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            if any(v == "adapters" for v in via.values()):
                _add_hub(model, name, placement, via, config, sites, hub_names)
            _install_hooks(model, name, placement, via, config, sites, build=True)
            inst = InstalledPlacement(model, name, placement, list(hub_names), via, config)
            _register(model, inst)
            _check_discovery(inst)
            if activate:
                inst.activate(head)
        except BaseException:
            _undo_install(model, name, hub_names)
            raise
    return inst


def _container(model: nn.Module) -> nn.ModuleDict:
    box = getattr(model, CONTAINER, None)
    if box is None:
        box = nn.ModuleDict()
        box.placements = {}
        model.add_module(CONTAINER, box)
    if not hasattr(box, "placements"):
        box.placements = {}
    return box


def _register(model: nn.Module, inst: InstalledPlacement) -> None:
    _container(model).placements[inst.name] = {
        "placement": inst.placement.to_dict(), "hub": list(inst.hub), "via": dict(inst.via), "config": inst.config,
    }


def _undo_install(model: nn.Module, name: str, hub_names) -> None:
    """Take out what a failed ``apply`` or ``load`` of placement ``name`` had installed."""
    _remove_hooks(model, name)
    _drop_modules(model, name)
    for h in hub_names:
        model.delete_adapter(h)
    _unregister(model, name)


def _unregister(model: nn.Module, name: str) -> None:
    box = getattr(model, CONTAINER, None)
    if box is not None:
        getattr(box, "placements", {}).pop(name, None)
        if len(box) == 0 and not getattr(box, "placements", None):
            delattr(model, CONTAINER)


def _install_hooks(model, name, placement, via, config, sites: Sites, build: bool) -> None:
    conns = [c for c in placement.connections if via[c.id] == "hooks"]
    if not conns:
        return
    box = _container(model)
    mods: dict[str, PlacedAdapter] = {}
    for c in conns:
        key = f"{name}_{c.key}"
        if build:
            if key in box:
                raise ValueError(f"{CONTAINER}.{key} already exists")
            kc = _kind_config(config, c.kind)
            box[key] = PlacedAdapter(sites.hidden, placement.r, sites.hidden, kind=c.kind, connection=c.id, **kc)
        mods[c.id] = box[key]
    cache = _Cache()
    need_blk = sorted({c.source for c in conns if c.kind == "long"})
    need_in = sorted({(c.location, c.layer) for c in conns if c.kind in ("par", "seq")})
    for s in need_blk:
        (sites.embeddings if s == -1 else sites.layers[s]).register_forward_hook(_SourceHook(name, cache, ("blk", s)))
    for loc, layer in need_in:
        hook = _InputHook(name, cache, ("in", loc, layer))
        sites.output_module(loc, layer).register_forward_pre_hook(hook, with_kwargs=True)
    targets = sorted({(c.location, c.layer) for c in conns})
    for loc, layer in targets:
        here = [c for c in conns if (c.location, c.layer) == (loc, layer)]
        additive = [(mods[c.id], ("blk", c.source) if c.kind == "long" else ("in", loc, layer))
                    for c in here if c.kind != "seq"]
        seq = [c for c in here if c.kind == "seq"]
        out_mod = sites.output_module(loc, layer)
        hook = _TargetHook(name, cache, additive, mods[seq[0].id] if seq else None, out_mod.LayerNorm if seq else None,
                           ("in", loc, layer) if seq else None)
        out_mod.dropout.register_forward_hook(hook)
    sites.encoder.register_forward_hook(_ClearHook(name, cache))


def _remove_hooks(model: nn.Module, name: str) -> int:
    n = 0
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            for hid in [k for k, h in d.items() if isinstance(h, _HOOK_TYPES) and h.name == name]:
                del d[hid]
                for extra in _HOOK_FLAG_DICTS:
                    getattr(m, extra, {}).pop(hid, None)
                n += 1
    return n


def _drop_modules(model: nn.Module, name: str) -> None:
    box = getattr(model, CONTAINER, None)
    if box is None:
        return
    for key in [k for k in box.keys() if k.startswith(f"{name}_")]:

        for sub in box[key].modules():
            _masks._detach(sub)
        del box[key]


def _check_discovery(inst: InstalledPlacement) -> None:

    found = find_adapters(inst.model, pattern=inst.pattern)
    want = len(inst.placement.connections)
    if len(found) != want:
        names = ", ".join(i.name for i in found[:6])
        raise ValueError(
            f"the glob {inst.pattern!r} finds {len(found)} adapter modules but the placement has {want} "
            f"({names}{', ...' if len(found) > 6 else ''}); another module's name matches it: choose another name"
        )


def remove(model: nn.Module, name: str = "placement") -> None:
    """Take the placement ``name`` out of ``model``: hooks, hook adapters and AdapterHub adapters."""
    inst = installed(model, name)
    _remove_hooks(model, name)
    _drop_modules(model, name)
    for h in inst.hub:
        if h in getattr(model.adapters_config, "adapters", {}):
            model.delete_adapter(h)
    _unregister(model, name)


def _replace_dir(tmp: str, path: str) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(path))
    os.rmdir(old)
    if swap_in(tmp, path, old):
        shutil.rmtree(old, ignore_errors=True)


def save(model: nn.Module, path: str | os.PathLike, *, name: str = "placement", head: str | None = None) -> str:
    """Write the installed placement ``name`` to the directory ``path`` (replaced atomically).

    Layout: ``placement.json`` (the placement, where each connection lives, the config),
    one AdapterHub directory per AdapterHub adapter (``tropfast.export_adapter``: masks
    applied, pruned bottlenecks saved at their new size), ``hook_adapters.safetensors`` (the
    hook adapters in tropfast's sparse format) and, with ``head``, the prediction head.
    """

    inst = installed(model, name)
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp.", dir=parent)
    try:
        for h in inst.hub:
            export_adapter(model, h, os.path.join(tmp, h), with_head=False)
        if inst.modules:
            export_adapter(model, f"{CONTAINER}.{name}_*", os.path.join(tmp, HOOKS_FILE), format="sparse")
        if head is not None:
            model.save_head(os.path.join(tmp, "head"), head)
        meta = {
            "format": SAVED_FORMAT,
            "version": 1,
            "name": name,
            "placement": inst.placement.to_dict(),
            "hub": inst.hub,
            "via": inst.via,
            "config": inst.config,
            "head": head,
        }
        with open(os.path.join(tmp, "placement.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _loaded_name(got) -> str:
    # AdapterHub's loaders return the name, or (directory, name) for heads
    return got[-1] if isinstance(got, (tuple, list)) else got


def load(
    model: nn.Module, path: str | os.PathLike, *, activate: bool = True, keep_masks: bool = False
) -> InstalledPlacement:
    """Install a placement saved by ``save`` into ``model`` (same architecture) with its weights.

    The AdapterHub adapters are loaded with ``model.load_adapter``, the hook adapters with
    ``tropfast.load_sparse_adapter`` (pruned ones at their saved, possibly smaller, width;
    ``keep_masks`` keeps their zeros fixed while training).  A saved head is loaded too and
    made active.  Nothing is left behind if anything fails.
    """

    path = os.fspath(path)
    meta_path = os.path.join(path, "placement.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: not a directory written by tropfast.placement.save")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != SAVED_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {SAVED_FORMAT!r}")
    name = meta["name"]
    placement = Placement.from_dict(meta["placement"])
    via = dict(meta["via"])
    if set(via) != set(placement.ids):
        raise ValueError(f"{meta_path}: 'via' does not list the placement's connections")
    sites = find_sites(model)
    _check_fits(sites, placement)
    if name in _registry(model):
        raise ValueError(f"a placement named {name!r} is already installed")
    if meta["hub"] and not _hub_available(model):
        raise ValueError(f"{path} holds AdapterHub adapters ({', '.join(meta['hub'])}); load it into an AdapterHub "
                         "model (adapters.AutoAdapterModel, or adapters.init(model))")
    hub_names: list[str] = []
    head = meta.get("head")
    loaded_head = None
    try:
        for h in meta["hub"]:
            hub_names.append(_loaded_name(model.load_adapter(os.path.join(path, h), load_as=h, with_head=False)))
        _install_hooks(model, name, placement, via, meta.get("config"), sites, build=True)
        if any(v == "hooks" for v in via.values()):
            load_sparse_adapter(model, os.path.join(path, HOOKS_FILE), keep_masks=keep_masks)
        if head is not None and os.path.isdir(os.path.join(path, "head")):
            loaded_head = _loaded_name(model.load_head(os.path.join(path, "head")))
        inst = InstalledPlacement(model, name, placement, hub_names, via, meta.get("config"))
        _register(model, inst)
        _check_discovery(inst)
        if activate:
            inst.activate(loaded_head)
    except BaseException:
        if loaded_head is not None:
            model.delete_head(loaded_head)
        _undo_install(model, name, hub_names)
        raise
    return inst
