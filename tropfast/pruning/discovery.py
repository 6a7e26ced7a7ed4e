"""Find the bottleneck adapters of a model: y = x + B · act(A · x + a) + b.

Two kinds are recognised:

* AdapterHub ``adapters`` bottleneck adapters (``seq_bn``, ``double_seq_bn``, parallel):
  modules of type ``adapters.methods.modeling.Adapter``, whose ``adapter_down`` holds the
  down Linear and the activation and whose ``adapter_up`` is the up Linear.  They are
  located by module type, never by child index.
* Plain PyTorch modules chosen by a glob on their qualified name (``pattern=``) that hold
  exactly one down Linear (d_in -> r), an activation and one up Linear (r -> d_out).

A = down.weight: (r, d_in), B = up.weight: (d_out, r).
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["AdapterInfo", "UnsupportedAdapterError", "find_adapters", "activation_name"]


class UnsupportedAdapterError(ValueError):
    """An adapter this package cannot prune (PHM/Compacter layers, a non-ReLU activation, ...)."""


_ACTIVATION_TYPES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.SiLU: "swish",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.LeakyReLU: "leakyrelu",
    nn.ELU: "elu",
    nn.ReLU6: "relu6",
    nn.Mish: "mish",
    nn.Softplus: "softplus",
    nn.Hardswish: "hardswish",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.PReLU: "prelu",
}

_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def activation_name(act: Any) -> str:
    """A lower-case name for an activation module or function ("relu", "gelu", ...)."""
    inner = getattr(act, "f", None)  # AdapterHub's Activation_Function_Class wraps .f
    if inner is not None and type(act).__name__ == "Activation_Function_Class":
        return activation_name(inner)
    if isinstance(act, nn.Identity) or act is None:
        return "identity"
    for t, name in _ACTIVATION_TYPES.items():
        if type(act) is t:
            return name
    if any(act is f for f in _RELU_FUNCTIONS):
        return "relu"
    if isinstance(act, nn.Module):
        n = type(act).__name__.lower()
        for suffix in ("activation", "function"):
            if n.endswith(suffix) and len(n) > len(suffix):
                n = n[: -len(suffix)]
        return n
    return getattr(act, "__name__", type(act).__name__).lower()


def _is_activation(m: nn.Module) -> bool:
    if type(m) in _ACTIVATION_TYPES or type(m).__name__ == "Activation_Function_Class":
        return True
    # transformers' activation classes (GELUActivation, NewGELUActivation, ...)
    mod = type(m).__module__ or ""
    return mod.startswith("transformers.activations") and not list(m.parameters())


@dataclass
class AdapterInfo:
    """One bottleneck adapter: where it is, its shapes and activation.  A: (r, d_in), B: (d_out, r)."""

    name: str  # qualified module name of the adapter block
    kind: str  # "adapters" (AdapterHub) or "module" (plain PyTorch, matched by pattern)
    adapter: str | None  # AdapterHub adapter name; None for plain modules
    layer: int | None  # transformer layer index (AdapterHub), else None
    location: str | None  # AdapterHub location key ("output_adapter", "mh_adapter"), else None
    d_in: int
    r: int
    d_out: int
    activation: str
    down_name: str  # qualified name of the down Linear (its .weight is A)
    up_name: str  # qualified name of the up Linear (its .weight is B)
    supported: bool = True
    reason: str = ""  # why it is not supported
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    down: nn.Module | None = field(default=None, repr=False, compare=False)
    up: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def is_relu(self) -> bool:
        return self.activation == "relu"

    @property
    def shape_A(self) -> tuple[int, int]:
        return (self.r, self.d_in)

    @property
    def shape_B(self) -> tuple[int, int]:
        return (self.d_out, self.r)

    @property
    def numel(self) -> int:
        return self.r * (self.d_in + self.d_out)

    def sparsity(self) -> float:
        """Fraction of zero entries in A and B together."""
        if self.down is None or self.up is None or self.numel == 0:
            return 0.0
        z = int((self.down.weight == 0).sum()) + int((self.up.weight == 0).sum())
        return z / self.numel

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "adapter": self.adapter,
            "layer": self.layer,
            "location": self.location,
            "shape_A": list(self.shape_A),
            "shape_B": list(self.shape_B),
            "activation": self.activation,
            "supported": self.supported,
            "reason": self.reason,
            "sparsity": self.sparsity(),
        }


def _hub_adapter_class():
    # An AdapterHub module can only exist once the adapters package has been imported, so a
    # plain PyTorch model is never made to pay for importing it (and transformers): seconds.
    if "adapters" not in sys.modules:
        return None
    try:
        from adapters.methods.modeling import Adapter
    except Exception:  # adapters not installed: no AdapterHub modules can exist
        return None
    return Adapter


def _hub_phm_class():
    try:
        from adapters.methods.modeling import PHMLayer
    except Exception:
        return None
    return PHMLayer


def _hub_info(name: str, mod: nn.Module, parent: nn.Module | None) -> AdapterInfo:
    phm = _hub_phm_class()
    seq = getattr(mod, "adapter_down", None)
    up = getattr(mod, "adapter_up", None)
    children = list(seq.named_modules()) if isinstance(seq, nn.Module) else []
    downs = [(n, m) for n, m in children if isinstance(m, nn.Linear) or (phm is not None and isinstance(m, phm))]
    acts = [m for n, m in children if n and _is_activation(m)]
    hub_name = getattr(mod, "name", None)
    layer = getattr(parent, "layer_idx", None) if parent is not None else None
    location = getattr(parent, "location_key", None) if parent is not None else None
    act = activation_name(acts[-1]) if acts else "identity"
    is_phm = phm is not None and (isinstance(up, phm) or any(isinstance(m, phm) for _, m in downs))
    if is_phm:
        d = getattr(mod, "input_size", 0)
        r = getattr(mod, "down_sample", 0)
        return AdapterInfo(
            name, "adapters", hub_name, layer, location, d, r, d, act, f"{name}.adapter_down", f"{name}.adapter_up",
            supported=False,
            reason="PHM/Compacter layers (phm_layer=True) are Kronecker-factored; only dense Linear bottlenecks can be pruned",
            module=mod,
        )
    if len(downs) != 1 or not isinstance(up, nn.Linear):
        raise UnsupportedAdapterError(
            f"adapter {name!r}: expected one Linear inside adapter_down and a Linear adapter_up, "
            f"found {len(downs)} down layer(s) and adapter_up of type {type(up).__name__}"
        )
    dn, down = downs[0]
    info = AdapterInfo(
        name, "adapters", hub_name, layer, location, down.in_features, down.out_features, up.out_features, act,
        f"{name}.adapter_down.{dn}" if dn else f"{name}.adapter_down", f"{name}.adapter_up",
        module=mod, down=down, up=up,
    )
    if up.in_features != down.out_features:
        info.supported = False
        info.reason = f"down Linear has {down.out_features} outputs but up Linear takes {up.in_features}"
    return info


def _module_info(name: str, mod: nn.Module, activation: str | None) -> AdapterInfo:
    subs = [(n, m) for n, m in mod.named_modules() if n]
    if isinstance(mod, nn.Sequential) or not subs:
        subs = subs or [(name, mod)]
    linears = [(n, m) for n, m in subs if isinstance(m, nn.Linear)]
    if len(linears) != 2:
        raise UnsupportedAdapterError(
            f"module {name!r} ({type(mod).__name__}) matches the pattern but holds {len(linears)} Linear layers; "
            "a bottleneck adapter needs exactly one down and one up Linear"
        )
    (n1, l1), (n2, l2) = linears
    if l1.out_features == l2.in_features:
        (dn, down), (un, up) = (n1, l1), (n2, l2)
    elif l2.out_features == l1.in_features:
        (dn, down), (un, up) = (n2, l2), (n1, l1)
    else:
        raise UnsupportedAdapterError(
            f"module {name!r}: Linear {n1!r} {l1.in_features}->{l1.out_features} and {n2!r} "
            f"{l2.in_features}->{l2.out_features} do not form a bottleneck"
        )
    names = [n for n, _ in subs]
    lo, hi = sorted((names.index(dn), names.index(un)))
    acts = [m for n, m in subs[lo + 1 : hi] if _is_activation(m)] or [m for _, m in subs if _is_activation(m)]
    if acts:
        act = activation_name(acts[0])
        if activation is not None and activation.lower() != act:
            raise UnsupportedAdapterError(
                f"module {name!r} applies {act!r} but activation={activation!r} was given"
            )
    elif activation is not None:
        act = activation.lower()
    else:
        raise UnsupportedAdapterError(
            f"module {name!r} holds no activation module between its Linear layers; if its forward applies "
            "relu functionally, pass activation='relu'"
        )
    return AdapterInfo(
        name, "module", None, None, None, down.in_features, down.out_features, up.out_features, act,
        f"{name}.{dn}", f"{name}.{un}", module=mod, down=down, up=up,
    )


def find_adapters(
    model: nn.Module,
    adapter: str | None = None,
    pattern: str | None = None,
    activation: str | None = None,
) -> list[AdapterInfo]:
    """Every bottleneck adapter of ``model``, in module order.

    adapter: restrict to the AdapterHub adapter of that name.  pattern: a glob on qualified
    module names (``"encoder.*.bottleneck"``) selecting plain PyTorch adapter modules; with a
    pattern, AdapterHub adapters are listed only if they match it too.  activation: the
    activation of plain modules whose forward applies it functionally (no module to see).
    Unsupported adapters (PHM) are listed with ``supported=False`` and a reason.
    """
    hub_cls = _hub_adapter_class()
    parents: dict[int, nn.Module] = {}
    containers: set[int] = set()  # AdapterHub's own ``adapters`` ModuleDicts, empty ones too
    hubs: list[str] = []  # the hub adapters' names (a pattern may match modules holding them)
    for name, m in model.named_modules():
        if hub_cls is not None and isinstance(m, hub_cls):
            hubs.append(name)
        sub = getattr(m, "adapters", None)
        if isinstance(sub, nn.ModuleDict):
            if type(m).__module__.split(".")[0] == "adapters":
                containers.add(id(sub))
            for child in sub.values():
                parents[id(child)] = m
    out: list[AdapterInfo] = []
    taken: list[str] = []
    holders: list[tuple[str, str]] = []  # (a matched module holding hub adapters, its first adapter)
    for name, mod in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        is_hub = hub_cls is not None and isinstance(mod, hub_cls)
        if is_hub:
            if adapter is not None and getattr(mod, "name", None) != adapter:
                continue
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            out.append(_hub_info(name, mod, parents.get(id(mod))))
            taken.append(name)
        elif pattern is not None and adapter is None and name and fnmatch.fnmatchcase(name, pattern):
            inner = next((h for h in hubs if h.startswith(name + ".")), None)
            if inner is not None or (hub_cls is not None and id(mod) in containers):
                # AdapterHub's own modules (an ``adapters`` ModuleDict, a layer holding one) are
                # not plain adapters: the hub adapters inside match on their own
                if inner is not None:
                    holders.append((name, inner))
                continue
            out.append(_module_info(name, mod, activation))
            taken.append(name)
    if not out:
        if adapter is not None:
            known = sorted({i.adapter for i in find_adapters(model) if i.adapter}) if pattern is None else []
            raise LookupError(
                f"no AdapterHub adapter named {adapter!r} in the model"
                + (f" (adapters present: {', '.join(known)})" if known else "")
            )
        if pattern is not None and holders:
            raise LookupError(
                f"the pattern {pattern!r} matches only modules that hold AdapterHub adapters "
                f"({holders[0][0]}, ...); match the adapters themselves ({holders[0][1]}, ...), "
                "or pass adapter=NAME"
            )
        if pattern is not None:
            raise LookupError(f"no module name matches the pattern {pattern!r}")
        raise LookupError(
            "no bottleneck adapter found: the model has no AdapterHub adapter; for plain PyTorch "
            "adapters pass pattern='glob.on.*.module.names'"
        )
    return out
