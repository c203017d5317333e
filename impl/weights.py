"""Strict weight loading: every key consumed, every parameter filled, every shape checked, errors by name."""
from __future__ import annotations

import json
import math
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


TEXT_WEIGHTS = "model"  # the weight file name of text_encoder*/ in the diffusers layout
MODEL_WEIGHTS = "diffusion_pytorch_model"  # the weight file name of transformer/ and vae/
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(directory: str | Path, base: str) -> list[Path]:
    """The files a component folder's weights are read from, by the layout's one rule: ``<base>.safetensors``, or the
    shards that ``<base>.safetensors.index.json`` names (plain file names in the folder). A folder where loaders
    could read other bytes is refused with the reason: both forms present (loaders differ on which wins), or the
    rule's file absent beside another weight name or a pickle (a loader may fall back to it)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory")
    single, index = d / f"{base}.safetensors", d / f"{base}.safetensors.index.json"
    if single.is_file() and index.is_file():
        raise WeightError(f"{d}: holds both {single.name} and {index.name}; loaders differ on which one they read, "
                          "so the sides could compare different weights: keep one")
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(_weight_map(index).values()))
        escaping = [s for s in shards if Path(s).name != s or s in (".", "..")]
        if escaping:
            raise WeightError(f"{index}: shard names must be files in {d}: {', '.join(escaping[:5])}")
        return [d / s for s in shards]
    others = sorted(p.name for p in d.iterdir() if p.is_file() and (p.suffix in PICKLES or p.name.endswith(
        (".safetensors", ".safetensors.index.json"))))
    if others:
        raise WeightError(f"{d}: no {single.name} (or {index.name}), the file this folder's weights are read from; "
                          f"it holds {', '.join(others)}, which another loader might read instead (pickles are "
                          f"never read): rename or convert it to {single.name}")
    raise FileNotFoundError(f"{d}: no {single.name} or {index.name}")


def read_weights_dir(directory: str | Path, base: str) -> dict[str, Tensor]:
    """All tensors of a component folder, from the files ``weight_files`` names."""
    d = Path(directory)
    files = weight_files(d, base)
    index = d / f"{base}.safetensors.index.json"
    return _read_index(d, index) if index.is_file() else read_safetensors(files[0])


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightError(f"{index}: weight_map must map tensor names to shard file names")
    return weight_map


def _read_index(d: Path, index: Path) -> dict[str, Tensor]:
    weight_map = _weight_map(index)
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


MAX_DIM = 1 << 16  # widths, heads, channels, positions: above every released model, far below an allocation bomb
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 20


def config_value(cfg: dict, source: str | Path, key: str, kind: type = int, default=None, lo: int | float | None = None,
                 hi: int | float | None = None):
    """``cfg[key]`` checked for type and range; a missing key without a default is an error naming file and key.
    Integers are in [``lo``, ``hi``] (default [1, MAX_DIM]); floats are finite (and >= ``lo`` when given)."""
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
    if kind is int:
        lo, hi = 1 if lo is None else lo, MAX_DIM if hi is None else hi
        if not lo <= value <= hi:
            raise ValueError(f"{source}: config key {key!r} is {value}; expected {lo} to {hi}")
    if kind is float and not (math.isfinite(value) and (lo is None or value >= lo)):
        raise ValueError(f"{source}: config key {key!r} is {value!r}; expected a finite number"
                         + (f" >= {lo}" if lo is not None else ""))
    return value


def divides(source: str | Path, part_key: str, part: int, whole_key: str, whole: int) -> None:
    if whole % part:
        raise ValueError(f"{source}: config key {part_key!r} ({part}) does not divide {whole_key!r} ({whole})")


def _layout(own: dict, state: dict, source: str, tied: dict[str, str] | None, drop: tuple[str, ...],
            values: bool) -> dict:
    """``state`` keyed as ``own`` (ties resolved, ``drop`` removed), or a WeightError listing missing, unexpected and
    mis-shaped keys. ``own`` and ``state`` map names to anything with a ``shape``; ``values``: tensors, so tied
    keys that both hold data must hold the same."""
    state = {k: v for k, v in state.items() if k not in drop}
    for name, alias in (tied or {}).items():
        if name not in state and alias in state:
            state[name] = state[alias]
        elif values and name in state and alias in state and not torch.equal(state[name], state[alias]):
            raise WeightError(f"{source}: tied keys {name} and {alias} hold different values")
        if alias in state and alias not in own:
            state.pop(alias)  # consumed through the tie
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{source}: weights do not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise WeightError("\n".join(parts))
    return state


def expect_layout(build, meta: dict[str, TensorMeta], source: str, tied: dict[str, str] | None = None,
                  drop: tuple[str, ...] = ()) -> None:
    """Check stored tensors' names and shapes (``meta``, from headers) against the module ``build()`` makes, built
    on the meta device: nothing is allocated, so a config that asks for 10**9 layers fails here by name."""
    with torch.device("meta"):
        module = build()
    _layout(module.state_dict(), meta, source, tied, drop, values=False)


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str, tied: dict[str, str] | None = None,
                drop: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``. ``tied`` maps a parameter name to the key that may stand in for it;
    ``drop`` names checkpoint keys that are known and deliberately unused (each with its reason at the caller)."""
    own = module.state_dict()
    state = _layout(own, state, source, tied, drop, values=True)
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def round_through(module: nn.Module, dtype: torch.dtype, keep: tuple[type, ...] = (),
                  skip: frozenset[str] = frozenset()) -> nn.Module:
    """Every floating parameter and buffer rounded to ``dtype`` and kept in its own dtype, in place: weights stored
    in ``dtype`` that each op casts to the dtype it computes in. Those of submodules of the types ``keep``, and the
    parameters named in ``skip``, are left as they are (stored in the dtype they compute in)."""
    with torch.no_grad():
        for prefix, m in module.named_modules():
            if isinstance(m, keep):
                continue
            for name, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)):
                if t.is_floating_point() and f"{prefix}.{name}".lstrip(".") not in skip:
                    t.copy_(t.to(dtype))
    return module
