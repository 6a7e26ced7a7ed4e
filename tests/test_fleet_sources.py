"""Finding saved adapters by content (tropfast.fleet.sources)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fleet_fixtures import make_checkpoint, save_hub, save_sharded, tied_state
from safetensors.torch import save_file

from tropfast.fleet import sources as S


def test_discover_kinds_by_content(tmp_path):
    # names do not give the kind away: an adapter folder called "x.safetensors", a checkpoint called "ckpt.bin"
    save_hub(str(tmp_path / "x.safetensors"), 0, "a")
    make_checkpoint(str(tmp_path / "ckpt.bin"))
    save_file({"m.down.weight": torch.ones(2, 3), "m.up.weight": torch.ones(3, 2)}, str(tmp_path / "plain.safetensors"))
    torch.save({"m.down.weight": torch.ones(2, 3)}, str(tmp_path / "plain.bin"))
    specs = S.discover([str(tmp_path / n) for n in ("x.safetensors", "ckpt.bin", "plain.safetensors", "plain.bin")])
    assert [(s.kind, s.out_name) for s in specs] == [
        ("adapterhub", "x.safetensors"),
        ("checkpoint", "ckpt.bin"),
        ("safetensors", "plain.safetensors"),
        ("torch", "plain.bin"),
    ]


def test_folder_of_folders_mirrors_paths(tmp_path):
    root = tmp_path / "hub"
    save_hub(str(root / "b"), 1, "b")
    save_hub(str(root / "a"), 0, "a", safetensors=True)
    save_hub(str(root / "team" / "c"), 2, "c")
    (root / "notes.txt").write_text("not an adapter")
    (root / ".cache").mkdir()
    save_hub(str(root / ".cache" / "hidden"), 3, "h")
    specs = S.discover([str(root)])
    assert [s.out_name for s in specs] == ["hub/a", "hub/b", os.path.join("hub", "team", "c")]
    assert all(s.kind == "adapterhub" for s in specs)


def test_discover_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        S.discover([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SourceError, match="holds no adapter folder"):
        S.discover([str(tmp_path / "empty")])
    save_hub(str(tmp_path / "one" / "x"), 0, "a")
    save_hub(str(tmp_path / "two" / "x"), 1, "a")
    with pytest.raises(ValueError, match="both be written to out/x"):
        S.discover([str(tmp_path / "one" / "x"), str(tmp_path / "two" / "x")])


def test_pairing_default_hub_names_skips_layernorm():
    shapes = {
        "enc.layer.0.out.adapters.a.adapter_down.0.weight": (6,),  # ln_before LayerNorm: 1-D
        "enc.layer.0.out.adapters.a.adapter_down.1.weight": (4, 6),
        "enc.layer.0.out.adapters.a.adapter_up.weight": (6, 4),
        "enc.layer.0.attention.weight": (6, 6),
    }
    assert S.pair_keys(shapes, S.DEFAULT_DOWN_KEY, S.DEFAULT_UP_KEY, "f") == [
        ("enc.layer.0.out.adapters.a.adapter_down.1.weight", "enc.layer.0.out.adapters.a.adapter_up.weight")
    ]


def test_pairing_custom_globs_and_errors():
    shapes = {
        "l1.ad.down.weight": (2, 5),
        "l1.ad.up.weight": (5, 2),
        "l2.ad.down.weight": (2, 5),
        "l2.ad.up.weight": (5, 2),
    }
    assert S.pair_keys(shapes, "*.down.weight", "*.up.weight", "f") == [
        ("l1.ad.down.weight", "l1.ad.up.weight"),
        ("l2.ad.down.weight", "l2.ad.up.weight"),
    ]
    with pytest.raises(S.SourceError, match="l2.ad.down.weight' has no up tensor"):
        S.pair_keys({k: v for k, v in shapes.items() if k != "l2.ad.up.weight"}, "*.down.weight", "*.up.weight", "f")
    with pytest.raises(S.SourceError, match="up tensor 'l2.ad.up.weight' has no down"):
        S.pair_keys({k: v for k, v in shapes.items() if k != "l2.ad.down.weight"}, "*.down.weight", "*.up.weight", "f")
    with pytest.raises(S.SourceError, match="no tensor pair matches"):
        S.pair_keys(shapes, "*.lora_A", "*.lora_B", "f")
    with pytest.raises(S.SourceError, match="matches both"):
        S.pair_keys(shapes, "*.weight", "*.up.weight", "f")


def test_plain_safetensors_order_is_natural_and_shapes_checked(tmp_path):
    sd = {f"blocks.{i}.ad.down.weight": torch.ones(2, 3) for i in (10, 2, 1)}
    sd.update({f"blocks.{i}.ad.up.weight": torch.ones(3, 2) for i in (10, 2, 1)})
    p = str(tmp_path / "s.safetensors")
    save_file(sd, p)
    idx = S.index_source(S.discover([p])[0], "*.down.weight", "*.up.weight")
    assert [e.name for e in idx.adapters] == ["blocks.1.ad", "blocks.2.ad", "blocks.10.ad"]
    assert [e.layer for e in idx.adapters] == [1, 2, 10]
    assert idx.activation == "relu" and idx.activation_assumed
    sd["blocks.2.ad.up.weight"] = torch.ones(3, 5)
    save_file(sd, p)
    with pytest.raises(S.SourceError, match="not a bottleneck"):
        S.index_source(S.discover([p])[0], "*.down.weight", "*.up.weight")


def test_torch_file_keeps_saved_order(tmp_path):
    sd = {}
    for i in (10, 2):
        sd[f"b.{i}.down.weight"] = torch.ones(2, 3)
        sd[f"b.{i}.up.weight"] = torch.ones(3, 2)
    p = str(tmp_path / "s.bin")
    torch.save(sd, p)
    idx = S.index_source(S.discover([p])[0], "*.down.weight", "*.up.weight")
    assert [e.name for e in idx.adapters] == ["b.10", "b.2"]


def _hub_with_config(tmp_path, **changes) -> str:
    d = save_hub(str(tmp_path / "h"), 0, "a")
    cfg_path = os.path.join(d, "adapter_config.json")
    meta = json.loads(Path(cfg_path).read_text())
    meta["config"].update(changes)
    Path(cfg_path).write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": "lora"}, "'lora' adapter, not a bottleneck"),
        ({"phm_layer": True}, "PHM/Compacter"),
        ({"non_linearity": "gelu"}, "activation 'gelu'.*allow_non_relu"),
    ],
)
def test_unsupported_hub_configs(tmp_path, changes, message):
    d = _hub_with_config(tmp_path, **changes)
    with pytest.raises(S.UnsupportedSourceError, match=message):
        S.index_source(S.discover([d])[0])


def test_non_relu_allowed_when_asked(tmp_path):
    d = _hub_with_config(tmp_path, non_linearity="gelu")
    idx = S.index_source(S.discover([d])[0], allow_non_relu=True)
    assert idx.activation == "gelu" and len(idx.adapters) == 4


def test_checkpoint_reads_only_adapter_tensors(tmp_path, monkeypatch):
    sd = tied_state(0)
    ck = save_sharded(str(tmp_path / "ck"), sd, shards=3)
    spec = S.discover([ck])[0]
    assert spec.kind == "checkpoint"
    idx = S.index_source(spec, "*.down.weight", "*.up.weight")
    assert len(idx.adapters) == 6 and len({e.file for e in idx.adapters}) >= 2
    from tropfast.fleet import stio

    read: list[tuple[str, int, int]] = []  # (file, first byte, end) of every read
    real = stio._read_run

    def spy(f, pos, n, path):
        read.append((path, pos, pos + n))
        return real(f, pos, n, path)

    monkeypatch.setattr(stio, "_read_run", spy)
    got = S.read_adapters(idx)
    assert read
    for path, b, e in read:  # every byte read belongs to an adapter tensor
        h = idx.headers[path]
        hit = [k for k, t in h.tensors.items() if h.data_start + t.begin < e and b < h.data_start + t.end]
        assert hit and all(".down." in k or ".up." in k for k in hit), hit
    # and every adapter tensor was read
    want = {(e.files[k], k) for e in idx.adapters for k in e.keys}
    for path, k in want:
        t = idx.headers[path].tensors[k]
        d0 = idx.headers[path].data_start
        assert any(p == path and b <= d0 + t.begin and d0 + t.end <= e for p, b, e in read), k
    assert torch.equal(got[0][0], sd["model.layers.0.attn_adapter.down.weight"])
    assert torch.equal(got[0][2], sd["model.layers.0.attn_adapter.down.bias"])


def test_non_finite_weights_named(tmp_path):
    sd = tied_state(1)
    sd["model.layers.1.ffn_adapter.up.bias"][3] = float("nan")
    p = str(tmp_path / "nan.safetensors")
    save_file(sd, p)
    idx = S.index_source(S.discover([p])[0], "*.down.weight", "*.up.weight")
    with pytest.raises(
        S.SourceError, match=r"nan.safetensors: tensor model.layers.1.ffn_adapter.up.bias has non-finite values \(1 NaN"
    ):
        S.read_adapters(idx)


def test_corrupt_bin_named(tmp_path):
    p = tmp_path / "bad.bin"
    p.write_bytes(b"this is not a torch file")
    with pytest.raises(S.SourceError, match="bad.bin: cannot be loaded"):
        S.index_source(S.discover([str(p)])[0])
