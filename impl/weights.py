"""Strict weight loading: every key consumed, every parameter filled, every shape checked, errors by name."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import Tensor, nn


class WeightError(ValueError):
    pass


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Load a .safetensors file, refusing pickles and reporting a damaged header by file name."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise WeightError(f"{path}: this is a pickle/zip checkpoint; only .safetensors files are loaded "
                              "(pickles can run code on load). Convert it with safetensors first.")
        if len(head) < 8:
            raise WeightError(f"{path}: file is {len(head)} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > size - 8 or n > 100_000_000:
            raise WeightError(f"{path}: header length {n} exceeds the file size {size} (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightError(f"{path}: safetensors header is not valid JSON ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightError(f"{path}: tensors need {8 + n + end} bytes but the file has {size} (truncated)")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise WeightError(f"{path}: {e}") from None


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str, tied: dict[str, str] | None = None) -> None:
    """Copy ``state`` into ``module``. ``tied`` maps a parameter name to the key that may stand in for it."""
    state = dict(state)
    for name, alias in (tied or {}).items():
        if name not in state and alias in state:
            state[name] = state[alias]
        if alias in state and alias not in dict(module.named_parameters()):
            state.pop(alias)  # consumed through the tie
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{source}: weights do not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise WeightError("\n".join(parts))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])
