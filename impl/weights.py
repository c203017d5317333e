"""Strict weight loading: every key consumed, every parameter filled, every shape checked, errors by name."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import Tensor, nn


class WeightError(ValueError):
    pass


class TensorMeta:
    """A stored tensor's name-level facts (dtype, shape) without its data."""

    def __init__(self, dtype: str, shape: list[int]):
        self.dtype, self.shape = dtype, torch.Size(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _header(path: Path) -> dict:
    """The parsed JSON header of a safetensors file, checked for the layout (errors name the file and key)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = path.stat().st_size
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        brace = b""
        if len(head) == 8 and n <= size - 8:
            brace = f.read(1)
            f.seek(8)
        # a pickle starts with 0x80 (protocol >= 2) or "PK" (zip): but so may a safetensors header length (its low
        # byte), so the file is a pickle only if it does not look like safetensors ({ right after the length)
        if brace != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise WeightError(f"{path}: this is a pickle/zip checkpoint; only .safetensors files are loaded "
                              "(pickles can run code on load). Convert it with safetensors first.")
        if len(head) < 8:
            raise WeightError(f"{path}: file is {len(head)} bytes, too short for a safetensors header")
        if n > size - 8 or n > 100_000_000:
            raise WeightError(f"{path}: header length {n} exceeds the file size {size} (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: safetensors header is {type(header).__name__}, not an object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        shape = v.get("shape") if isinstance(v, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
                or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(v.get("dtype"), str)):
            raise WeightError(f"{path}: header entry {k!r} lacks integer data_offsets, shape or a dtype")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise WeightError(f"{path}: tensors need {8 + n + end} bytes but the file has {size} (truncated)")
    return header


def read_safetensors_meta(path: str | Path) -> dict[str, TensorMeta]:
    """Names, dtypes and shapes of a safetensors file, from its header alone (no tensor is read)."""
    return {k: TensorMeta(v["dtype"], v["shape"]) for k, v in _header(Path(path)).items() if k != "__metadata__"}


def safetensors_keys(path: str | Path) -> list[str]:
    return list(read_safetensors_meta(path))


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Load a .safetensors file, refusing pickles and reporting a damaged header by file name."""
    path = Path(path)
    _header(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise WeightError(f"{path}: {e}") from None


def read_weights_dir(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a transformers/diffusers component folder: ``model.safetensors`` (transformers) or
    ``diffusion_pytorch_model.safetensors`` (diffusers), or a sharded set named by the matching
    ``.safetensors.index.json``. Pickle-only folders are refused by name."""
    d = Path(directory)
    for base in ("model", "diffusion_pytorch_model"):
        if (d / f"{base}.safetensors.index.json").is_file():
            return _read_index(d, d / f"{base}.safetensors.index.json")
        if (d / f"{base}.safetensors").is_file():
            return read_safetensors(d / f"{base}.safetensors")
    pickles = sorted(p.name for p in d.glob("*.bin")) if d.is_dir() else []
    if pickles:
        raise WeightError(f"{d}: only pickle weights ({', '.join(pickles)}); only .safetensors files are loaded")
    raise FileNotFoundError(f"{d}: no model.safetensors, diffusion_pytorch_model.safetensors or a sharded index")


def _read_index(d: Path, index: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(d / shard)
        extra = sorted(k for k in part if weight_map.get(k) != shard)
        if extra:
            raise WeightError(f"{d / shard}: keys not listed for this shard in {index.name}: {', '.join(extra[:10])}")
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise WeightError(f"{index}: keys listed but absent from their shards: {', '.join(missing[:10])}")
    return state


def read_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def config_value(cfg: dict, source: str | Path, key: str, kind: type = int, default=None):
    """``cfg[key]`` checked for type; a missing key without a default is an error naming file and key."""
    if key not in cfg:
        if default is not None:
            return default
        raise ValueError(f"{source}: config key {key!r} is missing")
    value = cfg[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{source}: config key {key!r} is {value!r}; expected {kind.__name__}")
    return value


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str, tied: dict[str, str] | None = None,
                drop: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``. ``tied`` maps a parameter name to the key that may stand in for it;
    ``drop`` names checkpoint keys that are known and deliberately unused (each with its reason at the caller)."""
    state = {k: v for k, v in state.items() if k not in drop}
    for name, alias in (tied or {}).items():
        if name not in state and alias in state:
            state[name] = state[alias]
        elif name in state and alias in state and not torch.equal(state[name], state[alias]):
            raise WeightError(f"{source}: tied keys {name} and {alias} hold different values")
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
