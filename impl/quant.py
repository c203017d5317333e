"""Scaled-fp8 checkpoints: linear weights stored as float8 with one scale per tensor.

Two layouts name the scales (keys relative to the model's prefix):

* ``scaled_fp8`` (an empty marker tensor) with ``L.scale_weight`` per layer ``L``, optionally ``L.scale_input``;
* ``L.comfy_quant`` (a uint8 tensor holding JSON such as ``{"format": "float8_e4m3fn"}``) with ``L.weight_scale``,
  optionally ``L.input_scale``.

A layer's weight is ``weight.to(dtype) * scale.to(dtype)`` in the dtype it computes in: two roundings when that
dtype is narrower than float32. Input scales only serve a float8 matrix product; a dequantized weight computes in
full precision, so they are not read.
"""
from __future__ import annotations

import json

import torch
from torch import Tensor

from impl.weights import WeightError

FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
MARKER = "scaled_fp8"


def is_quantized(keys) -> bool:
    """Whether a state's keys (relative to the model's prefix) use either scaled layout."""
    return any(k == MARKER or k.endswith(".comfy_quant") for k in keys)


SCALE_KEYS = (".scale_weight", ".scale_input", ".comfy_quant", ".weight_scale", ".input_scale")


def without_scales(state: dict) -> dict:
    """``state`` (names to anything) without the keys only the scaled layouts add (the marker, the formats, the
    scales): the names the model itself has, for a layout check before loading."""
    return {k: v for k, v in state.items() if k != MARKER and not k.endswith(SCALE_KEYS)}


def _layers(state: dict[str, Tensor], source: str) -> dict[str, tuple[str, str, str]]:
    """layer -> (format, its scale's key, its input scale's key) for every scaled layer of ``state``."""
    layers = {}
    if MARKER in state:
        for k in state:
            if k.endswith(".scale_weight"):
                layer = k[:-len(".scale_weight")]
                layers[layer] = ("float8_e4m3fn", k, f"{layer}.scale_input")
    for k, t in state.items():
        if not k.endswith(".comfy_quant"):
            continue
        layer = k[:-len(".comfy_quant")]
        try:
            conf = json.loads(t.numpy().tobytes())
            fmt = conf["format"]
        except (ValueError, KeyError, TypeError, RuntimeError):
            raise WeightError(f"{source}: {k} is not the JSON of a quantization format") from None
        if fmt not in FP8:
            raise WeightError(f"{source}: {k}: format {fmt!r} is not read (only {', '.join(FP8)})")
        layers[layer] = (fmt, f"{layer}.weight_scale", f"{layer}.input_scale")
    return layers


def dequantize(state: dict[str, Tensor], dtype: torch.dtype, source: str) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` with every scaled layer's weight dequantized into ``dtype`` and the scale keys consumed, and the
    names of those layers. A scale without its weight, a weight not in the format named, or a scale that is not one
    number is an error naming the key."""
    layers = _layers(state, source)
    out = {k: v for k, v in state.items() if k != MARKER and not k.endswith(".comfy_quant")}
    for layer, (fmt, scale_key, input_key) in layers.items():
        weight_key = f"{layer}.weight"
        if weight_key not in out or scale_key not in out:
            missing = weight_key if weight_key not in out else scale_key
            raise WeightError(f"{source}: layer {layer} is scaled but {missing} is missing")
        weight, scale = out[weight_key], out.pop(scale_key)
        out.pop(input_key, None)
        if weight.dtype != FP8[fmt]:
            raise WeightError(f"{source}: {weight_key} is {weight.dtype}, but its layer's format is {fmt}")
        if scale.numel() != 1 or not scale.is_floating_point():
            raise WeightError(f"{source}: {scale_key} has shape {tuple(scale.shape)} and dtype {scale.dtype}; "
                              "expected one floating-point number")
        out[weight_key] = weight.to(dtype) * scale.reshape(()).to(dtype)
    return out, sorted(layers)


def column_major(module: torch.nn.Module, layers: list[str]) -> torch.nn.Module:
    """The weights of the linear ``layers`` stored column-major (the same values): ``F.linear`` then multiplies by
    a row-major ``W^T``, as when a dequantized weight is the contiguous copy of its transpose."""
    for name in layers:
        m = module.get_submodule(name)
        m.weight = torch.nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=m.weight.requires_grad)
    return module
