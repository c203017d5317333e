"""Records: one tensor per coordinate, produced by each side on its own, in the order it computed them.

A side yields an ordered ``{key: (fields, tensor)}``. The key is built from the fields that name a record (model,
prompt, component, layer, step, branch); ``block`` and ``stream`` follow from an MMDiT layer name, and ``seq`` is
the record's place in the side's execution order (0, 1, ...). Goldens store the same keys and fields, so impl, a
live reference and a golden set compare the same way. ``paired`` walks two sides in the reference's execution
order, so the first failing pair is the first place where the computations part.
"""
from __future__ import annotations

import itertools

from torch import Tensor

KEY_FIELDS = ("model", "prompt", "component", "layer", "step", "branch")
Side = dict[str, tuple[dict, Tensor]]


def coords(layer: str) -> dict:
    """block and stream of an MMDiT record name (``block.3.x.attn.q`` -> 3, image)."""
    parts = layer.split(".")
    if parts[0] == "block" and len(parts) > 2:
        return {"block": int(parts[1]), "stream": "image" if parts[2] == "x" else "context"}
    return {"block": None, "stream": None}


def key(fields: dict) -> str:
    return "|".join("" if fields.get(f) is None else str(fields[f]) for f in KEY_FIELDS)


class Recorder:
    """Collects one side's records. ``tick()`` hands out capture times; ``put`` stores a record at a capture time
    (``at``, default now) and a position within it (``sub``: the branch of a batch), and ``side()`` returns the
    records ordered by (time, position) with ``seq`` numbered 0, 1, ... in that order."""

    def __init__(self):
        self._clock = itertools.count()
        self._items: dict[str, tuple[dict, Tensor, tuple[int, int]]] = {}

    def tick(self) -> int:
        return next(self._clock)

    def put(self, tensor: Tensor, at: int | None = None, sub: int = 0, **fields) -> None:
        fields = {f: fields.get(f) for f in KEY_FIELDS}
        if fields["component"] == "mmdit":
            fields.update(coords(fields["layer"]))
        k = key(fields)
        if k in self._items:
            raise ValueError(f"record {k} produced twice")
        self._items[k] = (fields, tensor.detach(), (self.tick() if at is None else at, sub))

    def side(self) -> Side:
        ordered = sorted(self._items.items(), key=lambda kv: kv[1][2])
        return {k: ({**fields, "seq": n}, t) for n, (k, (fields, t, _)) in enumerate(ordered)}


def merge(*sides: Side) -> Side:
    """Sides of consecutive parts of one run (text, then each model's image run) as one, renumbered in order."""
    out: Side = {}
    for side in sides:
        for k, (fields, t) in side.items():
            out[k] = ({**fields, "seq": len(out)}, t)
    return out


def paired(impl: Side, ref: Side):
    """(fields, impl tensor or None, reference tensor or None) in the reference's execution order; a record only
    impl produced comes right after the record impl produced before it."""
    after: dict[str | None, list[str]] = {}
    prev = None
    for k in impl:
        if k in ref:
            prev = k
        else:
            after.setdefault(prev, []).append(k)
    for k in after.get(None, []):
        yield impl[k][0], impl[k][1], None
    for k, (fields, want) in ref.items():
        yield fields, (impl[k][1] if k in impl else None), want
        for extra in after.get(k, []):
            yield impl[extra][0], impl[extra][1], None
