"""Candidate adapter connections c = (source s, target t).

A connection adds ``adapter(h_s)`` at the insertion point of a sublayer (see ``sites``):

* ``seq``   sequential, at layer l after attention (``attn``) or after the FFN (``ffn``):
            the source is the sublayer's own output, as AdapterHub's ``seq_bn``
            (``mh_adapter`` / ``output_adapter``) does;
* ``par``   parallel: the source is the sublayer's input, as AdapterHub's ``par_bn``;
* ``long``  long-range: the source is the block output h_s (s = -1 is the embeddings,
            s = 0..L-1 the layers), the target the FFN insertion point of a later layer
            t > s.  AdapterHub has no such adapter; ``install`` adds it with forward hooks.

Recurrent connections (s > t, fed by the previous forward's activations) are not offered:
they make a prediction depend on the batch that came before it.

Design choice of this project (the placement paper publishes no code): long-range targets
are the FFN insertion points only, and every source is a full residual-stream activation,
so every candidate maps hidden -> hidden.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .sites import LOCATIONS, Sites

__all__ = ["KINDS", "STANDARD_KINDS", "Candidate", "candidates", "parse_id"]

KINDS = ("seq", "par", "long")
STANDARD_KINDS = ("seq", "par")  # what AdapterHub expresses


@dataclass(frozen=True, order=False)
class Candidate:
    """One connection.  layer/location: the target; source: the block index of a long-range source."""

    kind: str
    layer: int
    location: str
    source: int | None = None  # long only: -1 = embeddings, else a layer index < layer
    d_in: int = 0
    d_out: int = 0

    @property
    def id(self) -> str:
        if self.kind == "long":
            src = "emb" if self.source == -1 else f"L{self.source}"
            return f"long@{src}->L{self.layer}.{self.location}"
        return f"{self.kind}@L{self.layer}.{self.location}"

    @property
    def key(self) -> str:
        """A module-name-safe form of ``id`` (no dots)."""
        return self.id.replace("@", "_").replace("->", "_").replace(".", "_")

    @property
    def standard(self) -> bool:
        """Whether AdapterHub can express this connection (seq_bn / par_bn with leave_out)."""
        return self.kind in STANDARD_KINDS

    def weights(self, r: int) -> int:
        """Bottleneck weights at width r: r·d_in (A) + d_out·r (B)."""
        return int(r) * (self.d_in + self.d_out)

    def params(self, r: int) -> int:
        """Weights plus biases (r + d_out)."""
        return self.weights(r) + int(r) + self.d_out

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "location": self.location,
                "source": self.source, "d_in": self.d_in, "d_out": self.d_out}

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        c = cls(str(d["kind"]), int(d["layer"]), str(d["location"]),
                None if d.get("source") is None else int(d["source"]), int(d.get("d_in", 0)), int(d.get("d_out", 0)))
        c.check()
        return c

    def check(self, n_layers: int | None = None) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"connection kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.location not in LOCATIONS:
            raise ValueError(f"connection {self.id}: location {self.location!r} is not one of {', '.join(LOCATIONS)}")
        if self.layer < 0 or (n_layers is not None and self.layer >= n_layers):
            top = "L-1" if n_layers is None else n_layers - 1
            raise ValueError(f"connection {self.id}: layer {self.layer} outside 0..{top}")
        if self.kind == "long":
            if self.location != "ffn":
                raise ValueError(f"connection {self.id}: long-range connections target the FFN insertion point")
            if self.source is None or not -1 <= self.source < self.layer:
                raise ValueError(f"connection {self.id}: a long-range source must satisfy -1 <= s < t = {self.layer}")
        elif self.source is not None:
            raise ValueError(f"connection {self.id}: only long-range connections have a source index")


_ID = re.compile(r"^(seq|par)@L(\d+)\.(attn|ffn)$|^long@(emb|L\d+)->L(\d+)\.(ffn)$")


def parse_id(text: str, d: int = 0) -> Candidate:
    """The candidate named by its id (``seq@L3.ffn``, ``par@L0.attn``, ``long@emb->L4.ffn``)."""
    m = _ID.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a connection id (examples: seq@L3.ffn, par@L0.attn, long@L1->L4.ffn)")
    if m.group(1):
        c = Candidate(m.group(1), int(m.group(2)), m.group(3), None, d, d)
    else:
        s = -1 if m.group(4) == "emb" else int(m.group(4)[1:])
        c = Candidate("long", int(m.group(5)), "ffn", s, d, d)
    c.check()
    return c


def candidates(sites: Sites, kinds: tuple[str, ...] | list[str] = KINDS) -> list[Candidate]:
    """Every candidate of the given kinds, in canonical order: by target layer, attn before ffn,
    then seq, par, long (by source, embeddings first)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown connection kind(s) {bad}; choose from {', '.join(KINDS)} (recurrent is not offered)")
    d = sites.hidden
    out: list[Candidate] = []
    for t in range(sites.n_layers):
        for loc in LOCATIONS:
            for kind in ("seq", "par"):
                if kind in kinds:
                    out.append(Candidate(kind, t, loc, None, d, d))
            if loc == "ffn" and "long" in kinds:
                out.extend(Candidate("long", t, "ffn", s, d, d) for s in range(-1, t))
    return out
