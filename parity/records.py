"""Records: one tensor per coordinate, produced by each side on its own, then paired.

A side (impl or a reference) yields an ordered ``{key: (fields, tensor)}``. The key is built from the fields that
name a record (model, prompt, component, layer, step, branch); ``block`` and ``stream`` follow from an MMDiT
layer name. Goldens store the same keys, so impl, the live reference and a golden set compare the same way.
"""
from __future__ import annotations

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


def put(side: Side, tensor: Tensor, **fields) -> None:
    fields = {f: fields.get(f) for f in KEY_FIELDS}
    if fields["component"] in ("mmdit", "sampler", "vae"):
        fields.update(coords(fields["layer"]) if fields["component"] == "mmdit" else {"block": None, "stream": None})
    side[key(fields)] = (fields, tensor.detach())


def paired(impl: Side, ref: Side):
    """(fields, impl tensor or None, reference tensor or None) in the reference's order, then impl-only keys."""
    for k, (fields, want) in ref.items():
        yield fields, (impl[k][1] if k in impl else None), want
    for k, (fields, got) in impl.items():
        if k not in ref:
            yield fields, got, None
