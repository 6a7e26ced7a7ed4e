"""Find saved adapters by content and read their down/up tensors, never a backbone tensor.

A source is one of:

* ``adapterhub``  a folder written by ``model.save_adapter``: ``adapter_config.json`` and
                  ``pytorch_adapter.bin`` or ``adapter.safetensors`` (plus head files);
* ``safetensors`` a plain ``.safetensors`` state dict;
* ``torch``       a plain ``.bin``/``.pt``/``.pth`` state dict (loaded with ``weights_only=True``);
* ``checkpoint``  an HF-style model folder: ``model.safetensors.index.json`` and its shards,
                  or one ``model.safetensors``; only the adapter tensors are read (their
                  byte ranges, ``stio.read_tensors``), after the shard headers were parsed.

A folder that is none of these is searched (recursively) for sources of the four kinds.
In every kind, bottleneck pairs are found by two globs on tensor names (``*`` matches any
run of characters): a 2-D tensor matching ``down_key`` (A: r x d_in) and a 2-D tensor
matching ``up_key`` (B: d_out x r) form a pair when the text matched by their first ``*``
(and the following ones, as far as both globs have them) agrees.  The defaults follow
AdapterHub's naming (``...adapters.NAME.adapter_down.0.weight`` / ``...adapter_up.weight``;
1-D LayerNorm weights that also match are skipped).

Adapter order (positions for tie-breaks, the random score's draws): ``.bin`` files keep
their saved order, which is module order; safetensors files store names sorted, so they
are put in natural order (layer 2 before layer 10), which is module order for the usual
encoder naming (``attention.output`` before ``output`` in each layer).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..pruning.scores import all_finite
from .errors import CorruptFileError, SourceError, UnsupportedSourceError
from .stio import ST_DTYPES, Header, read_header, read_tensors

__all__ = [
    "DEFAULT_DOWN_KEY",
    "DEFAULT_UP_KEY",
    "AdapterEntry",
    "SourceError",
    "SourceIndex",
    "SourceSpec",
    "UnsupportedSourceError",
    "discover",
    "glob_regex",
    "index_source",
    "pair_keys",
    "read_adapters",
]

DEFAULT_DOWN_KEY = "*.adapter_down.*.weight"
DEFAULT_UP_KEY = "*.adapter_up.weight"
HUB_CONFIG = "adapter_config.json"
HUB_WEIGHTS = ("pytorch_adapter.bin", "adapter.safetensors")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class SourceSpec:
    """A source as planned: where it is, what kind, where its output goes.  Cheap (stat only)."""

    path: str  # absolute
    kind: str
    out_name: str  # relative path under out/
    est_bytes: int  # bytes of the files that hold its adapter tensors
    files: list[str]  # files whose size and mtime identify this input (for --resume)
    error: str | None = None  # set when the source is unusable already at discovery

    def fingerprint(self) -> list:
        out = []
        for f in self.files:
            try:
                st = os.stat(f)
                out.append([os.path.relpath(f, os.path.dirname(self.path)), st.st_size, st.st_mtime_ns])
            except OSError:
                out.append([f, None, None])
        return out


@dataclass
class AdapterEntry:
    """One bottleneck pair in a source.  A = down (r, d_in), B = up (d_out, r)."""

    name: str  # the text the first * matched (AdapterHub: the adapter module's name)
    down_key: str
    up_key: str
    down_bias_key: str | None
    up_bias_key: str | None
    file: str  # absolute path of the file (shard) holding A
    r: int
    d_in: int
    d_out: int
    dtype: torch.dtype
    layer: int | None
    hub: str | None  # AdapterHub adapter name, if the key says ".adapters.NAME."
    files: dict[str, str] = field(default_factory=dict)  # each of its tensor names -> the file holding it

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.down_key, self.up_key, self.down_bias_key, self.up_bias_key) if k is not None]

    @property
    def numel(self) -> int:
        return self.r * (self.d_in + self.d_out)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.r, self.d_in, self.d_out)


@dataclass
class SourceIndex:
    """A source's adapters, found from headers (safetensors) or the loaded state dict (torch)."""

    spec: SourceSpec
    fmt: str  # "safetensors" or "torch"
    adapters: list[AdapterEntry]
    activation: str
    weight_files: list[str]  # the files holding adapter tensors (absolute)
    headers: dict[str, Header] = field(default_factory=dict)
    state: dict[str, Tensor] | None = field(default=None, repr=False)  # torch kinds: the loaded file
    hub_meta: dict | None = None  # adapterhub: adapter_config.json; checkpoint: config.json
    activation_assumed: bool = False

    @property
    def numel(self) -> int:
        return sum(a.numel for a in self.adapters)

    @property
    def nbytes(self) -> int:
        return sum(a.numel * _itemsize(a.dtype) for a in self.adapters)


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


# ---------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------
def _checkpoint_index(d: str) -> str | None:
    names = sorted(os.listdir(d))
    if "model.safetensors.index.json" in names:
        return os.path.join(d, "model.safetensors.index.json")
    idx = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(idx) == 1:
        return os.path.join(d, idx[0])
    return None


def _kind_of_dir(d: str) -> str | None:
    if os.path.isfile(os.path.join(d, HUB_CONFIG)):
        return "adapterhub"
    if _checkpoint_index(d) or os.path.isfile(os.path.join(d, "model.safetensors")):
        return "checkpoint"
    return None


def _files_of(d: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
    return out


def _spec(path: str, kind: str, out_name: str) -> SourceSpec:
    if kind == "adapterhub":
        files = _files_of(path)
        present = [os.path.join(path, w) for w in HUB_WEIGHTS if os.path.isfile(os.path.join(path, w))]
        err = None
        if not present:
            err = f"{path}: adapter folder with {HUB_CONFIG} but neither {' nor '.join(HUB_WEIGHTS)}"
        elif len(present) > 1:
            err = f"{path}: holds both {' and '.join(HUB_WEIGHTS)}; keep the one the adapter should load"
        est = sum(os.path.getsize(p) for p in present)
        return SourceSpec(path, kind, out_name, est, files, err)
    if kind == "checkpoint":
        files = _files_of(path)
        est = sum(os.path.getsize(f) for f in files if f.endswith(".safetensors"))
        return SourceSpec(path, kind, out_name, est, files)
    return SourceSpec(path, kind, out_name, os.path.getsize(path), [path])


def _scan_dir(d: str, rel: str, out: list[SourceSpec]) -> None:
    kind = _kind_of_dir(d)
    if kind is not None:
        out.append(_spec(d, kind, rel))
        return
    for name in sorted(os.listdir(d)):
        if name.startswith("."):
            continue
        p = os.path.join(d, name)
        if os.path.isdir(p):
            _scan_dir(p, os.path.join(rel, name), out)
        elif name.endswith(".safetensors"):
            out.append(_spec(p, "safetensors", os.path.join(rel, name)))
        elif name.endswith(TORCH_SUFFIXES):
            out.append(_spec(p, "torch", os.path.join(rel, name)))


def discover(paths: list[str]) -> list[SourceSpec]:
    """Every source under ``paths``, in order.  A missing path raises; an empty folder too."""
    specs: list[SourceSpec] = []
    for p in paths:
        p = os.path.abspath(os.fspath(p))
        if not os.path.exists(p):
            raise FileNotFoundError(f"source {p} does not exist")
        base = os.path.basename(p.rstrip(os.sep)) or "source"
        if os.path.isdir(p):
            found: list[SourceSpec] = []
            _scan_dir(p, base, found)
            if not found:
                raise SourceError(
                    f"{p} holds no adapter folder ({HUB_CONFIG} + weights), "
                    "checkpoint (model.safetensors[.index.json]) or .safetensors/.bin file"
                )
            specs.extend(found)
        elif p.endswith(".safetensors"):
            specs.append(_spec(p, "safetensors", base))
        elif p.endswith(TORCH_SUFFIXES):
            specs.append(_spec(p, "torch", base))
        else:
            raise SourceError(f"{p}: not a folder, .safetensors or .bin/.pt file")
    seen: dict[str, str] = {}
    for s in specs:
        if s.out_name in seen:
            raise ValueError(f"sources {seen[s.out_name]} and {s.path} would both be written to out/{s.out_name}")
        seen[s.out_name] = s.path
    return specs


# ---------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------
def glob_regex(glob: str) -> re.Pattern:
    """A glob (``*``, ``?``, ``[...]``) as an anchored regex whose groups are the ``*`` matches."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append("(.*)")
        elif c == "?":
            out.append(".")
        elif c == "[" and "]" in glob[i + 2 :]:
            j = glob.index("]", i + 2)
            cls = glob[i + 1 : j]
            out.append("[" + ("^" + cls[1:] if cls.startswith("!") else cls).replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def natural_key(s: str) -> list:
    parts = re.split(r"(\d+)", s)
    return [int(x) if k % 2 else x for k, x in enumerate(parts)]


def pair_keys(shapes: dict[str, tuple[int, ...]], down_key: str, up_key: str, where: str) -> list[tuple[str, str]]:
    """(down, up) names of every bottleneck pair, in the order of ``shapes``.  Raises SourceError."""
    rd, ru = glob_regex(down_key), glob_regex(up_key)
    k = min(rd.groups, ru.groups)
    downs: dict[tuple, list[str]] = {}
    ups: dict[tuple, list[str]] = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        md, mu = rd.fullmatch(name), ru.fullmatch(name)
        if md and mu:
            raise SourceError(f"{where}: tensor {name!r} matches both --down-key {down_key!r} and --up-key {up_key!r}")
        if md:
            downs.setdefault(md.groups()[:k], []).append(name)
        elif mu:
            ups.setdefault(mu.groups()[:k], []).append(name)
    pairs = []
    for key, dl in downs.items():
        ul = ups.pop(key, [])
        if len(dl) > 1 or len(ul) > 1:
            raise SourceError(
                f"{where}: several tensors match one adapter ({', '.join(dl + ul)}); make the globs more specific"
            )
        if not ul:
            raise SourceError(f"{where}: down tensor {dl[0]!r} has no up tensor matching {up_key!r}")
        pairs.append((dl[0], ul[0]))
    if ups:
        lone = next(iter(ups.values()))[0]
        raise SourceError(f"{where}: up tensor {lone!r} has no down tensor matching {down_key!r}")
    if not pairs:
        raise SourceError(f"{where}: no tensor pair matches --down-key {down_key!r} / --up-key {up_key!r}")
    return pairs


_LAYER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
_HUB = re.compile(r"(?:^|\.)adapters\.([^.]+)\.")


def _layer_of(down_key: str, name: str) -> int | None:
    head = name.split(".adapters.")[0] if ".adapters." in name else name
    m = list(_LAYER.finditer(head))
    return int(m[-1].group(1)) if m else None


def _entries(
    pairs: list[tuple[str, str]],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype | None],
    files: dict[str, str],
    down_key: str,
    where: str,
) -> list[AdapterEntry]:
    rd = glob_regex(down_key)
    out = []
    for dk, uk in pairs:
        (r, d_in), (d_out, r2) = shapes[dk], shapes[uk]
        if r != r2:
            raise SourceError(
                f"{where}: {dk} is {r}x{d_in} but {uk} is {d_out}x{r2}: not a bottleneck (A: r x d_in, B: d_out x r)"
            )
        dt = dtypes[dk]
        if dt is None or not dt.is_floating_point or dtypes[uk] != dt:
            raise UnsupportedSourceError(
                f"{where}: {dk} / {uk} are {dtypes[dk]} / {dtypes[uk]}; pruning needs one floating dtype"
            )
        groups = rd.fullmatch(dk).groups()
        name = groups[0] if groups else dk.rsplit(".", 1)[0]
        name = name.rstrip(".")
        db = dk[: -len("weight")] + "bias" if dk.endswith("weight") else None
        ub = uk[: -len("weight")] + "bias" if uk.endswith("weight") else None
        db = db if db in shapes and shapes[db] == (r,) else None
        ub = ub if ub in shapes and shapes[ub] == (d_out,) else None
        hub = _HUB.search(dk)
        e = AdapterEntry(
            name, dk, uk, db, ub, files[dk], r, d_in, d_out, dt, _layer_of(dk, name), hub.group(1) if hub else None
        )
        e.files = {k: files[k] for k in e.keys}
        out.append(e)
    return out


# ---------------------------------------------------------------------------------------
# indexing and reading
# ---------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: not a JSON object")
    return obj


def _load_torch(path: str) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same to the user
        raise CorruptFileError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise SourceError(f"{path}: does not hold a state dict (a dict of name -> tensor)")
    return obj


def _hub_checks(cfg: dict, where: str, allow_non_relu: bool) -> str:
    """The activation of an AdapterHub bottleneck config; raises for what cannot be pruned."""
    arch = cfg.get("architecture")
    if arch not in (None, "bottleneck"):
        raise UnsupportedSourceError(f"{where}: a {arch!r} adapter, not a bottleneck adapter")
    if cfg.get("phm_layer"):
        raise UnsupportedSourceError(
            f"{where}: PHM/Compacter layers (phm_layer=true) are Kronecker-factored; "
            "only dense Linear bottlenecks can be pruned"
        )
    act = str(cfg.get("non_linearity") or "relu").lower()
    if act != "relu" and not allow_non_relu:
        raise UnsupportedSourceError(
            f"{where}: activation {act!r}; the tropical characterization is exact only for ReLU bottlenecks. "
            "Pass allow_non_relu=True (CLI: --allow-non-relu) to prune it anyway, as if it were ReLU"
        )
    return act


def index_source(
    spec: SourceSpec,
    down_key: str = DEFAULT_DOWN_KEY,
    up_key: str = DEFAULT_UP_KEY,
    activation: str | None = None,
    allow_non_relu: bool = False,
) -> SourceIndex:
    """Find the adapters of one source.  Raises SourceError (or a subclass) naming the file."""
    if spec.error:
        raise SourceError(spec.error)
    act, assumed, hub_meta = activation, False, None
    headers: dict[str, Header] = {}
    state = None
    if spec.kind == "adapterhub":
        hub_meta = _read_json(os.path.join(spec.path, HUB_CONFIG))
        cfg = hub_meta.get("config")
        if not isinstance(cfg, dict):
            raise SourceError(f"{os.path.join(spec.path, HUB_CONFIG)}: no 'config' object")
        act = _hub_checks(cfg, spec.path, allow_non_relu)
        wfile = next(os.path.join(spec.path, w) for w in HUB_WEIGHTS if os.path.isfile(os.path.join(spec.path, w)))
        fmt = "safetensors" if wfile.endswith(".safetensors") else "torch"
        weight_files = [wfile]
    elif spec.kind == "checkpoint":
        idx = _checkpoint_index(spec.path)
        if idx:
            imeta = _read_json(idx)
            wm = imeta.get("weight_map")
            if not isinstance(wm, dict):
                raise SourceError(f"{idx}: no 'weight_map' object")
            weight_files = sorted({os.path.join(spec.path, str(v)) for v in wm.values()})
            for f in weight_files:
                if os.path.dirname(os.path.abspath(f)) != spec.path:
                    raise SourceError(f"{idx}: shard {f} lies outside the checkpoint folder")
                if not os.path.isfile(f):
                    raise SourceError(f"{idx}: shard {os.path.basename(f)} is missing")
        else:
            weight_files = [os.path.join(spec.path, "model.safetensors")]
        fmt = "safetensors"
        cj = os.path.join(spec.path, "config.json")
        hub_meta = _read_json(cj) if os.path.isfile(cj) else None
    elif spec.kind == "safetensors":
        weight_files, fmt = [spec.path], "safetensors"
    elif spec.kind == "torch":
        weight_files, fmt = [spec.path], "torch"
    else:
        raise ValueError(f"unknown source kind {spec.kind!r}")

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype | None] = {}
    files: dict[str, str] = {}
    if fmt == "safetensors":
        for f in weight_files:
            h = read_header(f)
            headers[f] = h
            for name, info in h.tensors.items():
                if name in shapes:
                    raise SourceError(f"{spec.path}: tensor {name!r} is stored twice ({files[name]} and {f})")
                shapes[name], dtypes[name], files[name] = info.shape, ST_DTYPES[info.dtype][0], f
        order = sorted(shapes, key=natural_key)
        shapes = {k: shapes[k] for k in order}
    else:
        state = _load_torch(weight_files[0])
        for name, t in state.items():
            shapes[name], dtypes[name], files[name] = tuple(t.shape), t.dtype, weight_files[0]
    pairs = pair_keys(shapes, down_key, up_key, spec.path)
    entries = _entries(pairs, shapes, dtypes, files, down_key, spec.path)
    if spec.kind == "checkpoint" and hub_meta is not None and isinstance(hub_meta.get("adapters"), dict):
        # a model saved with AdapterHub adapters: config.json names each adapter's config
        amap, cmap = hub_meta["adapters"].get("adapters") or {}, hub_meta["adapters"].get("config_map") or {}
        acts = set()
        for e in entries:
            cfg = cmap.get(amap.get(e.hub)) if e.hub else None
            if isinstance(cfg, dict):
                acts.add(_hub_checks(cfg, f"{spec.path} (adapter {e.hub!r})", allow_non_relu))
        if acts:
            act = ",".join(sorted(acts))
    if act is None:
        act, assumed = "relu", True
    elif act.lower() != "relu" and not allow_non_relu and spec.kind not in ("adapterhub", "checkpoint"):
        raise UnsupportedSourceError(
            f"{spec.path}: activation {act!r}; the tropical characterization is exact only for ReLU bottlenecks "
            "(allow_non_relu=True prunes it anyway)"
        )
    return SourceIndex(spec, fmt, entries, act.lower(), weight_files, headers, state, hub_meta, assumed)


def read_adapters(
    index: SourceIndex, entries: list[AdapterEntry] | None = None
) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """(A, B, down bias or None) of ``entries`` (default: all), in their dtype, checked finite (biases too)."""
    entries = index.adapters if entries is None else entries
    want: dict[str, list[str]] = {}
    for e in entries:
        for k in e.keys:
            want.setdefault(e.files[k], []).append(k)
    got: dict[str, Tensor] = {}
    if index.fmt == "torch":
        got = {k: index.state[k] for ks in want.values() for k in ks}
    else:
        for f, keys in want.items():
            got.update(read_tensors(index.headers[f], keys))
    out = []
    # one sum per tensor (all_finite: the exact pass only where a sum is not finite)
    keys = [(e, k) for e in entries for k in e.keys if got[k].is_floating_point()]
    for (e, k), ok in zip(keys, all_finite([got[k] for _, k in keys])):
        if not ok:
            t = got[k]
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise SourceError(f"{e.files[k]}: tensor {k} has non-finite values ({n_nan} NaN, {n_inf} Inf)")
    for e in entries:
        out.append((got[e.down_key], got[e.up_key], got[e.down_bias_key] if e.down_bias_key else None))
    return out
