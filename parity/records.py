"""Records: one tensor per coordinate, produced by each side on its own, in the order it computed them.

A side yields an ordered ``{key: (fields, tensor)}``. The key is built from the fields that name a record (model,
prompt, component, layer, step, branch); ``block`` and ``stream`` follow from an MMDiT layer name, and ``seq`` is
the record's place in the side's execution order (0, 1, ...). Goldens store the same keys and fields, so impl, a
live reference and a golden set compare the same way. ``paired`` walks two sides in the reference's execution
order, so the first failing pair is the first place where the computations part.

Memory: a recorder keeps record tensors in memory up to a budget (``$SD3PARITY_RECORD_MEMORY`` MB, default 128),
then appends the rest to an anonymous temporary file (unlinked when created, so nothing is left behind even by a
killed run; closed when the records are dropped) and keeps a ``Spilled`` handle; ``load`` reads one back when it is
compared. A record that is a view of a larger tensor is copied, so it does not keep the whole batch alive.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from typing import Callable

import torch
import xxhash
from torch import Tensor

KEY_FIELDS = ("model", "prompt", "component", "layer", "step", "branch")
WEIGHT = "weight:"  # the layer name of a loaded parameter's record: weight:<impl's parameter name>


def is_weight(fields: dict) -> bool:
    return fields["layer"].startswith(WEIGHT)
Side = dict[str, tuple[dict, Tensor]]


def coords(layer: str) -> dict:
    """block and stream of an MMDiT record name (``block.3.x.attn.q`` -> 3, image)."""
    parts = layer.split(".")
    if parts[0] == "block" and len(parts) > 2:
        return {"block": int(parts[1]), "stream": "image" if parts[2] == "x" else "context"}
    return {"block": None, "stream": None}


def key(fields: dict) -> str:
    return "|".join("" if fields.get(f) is None else str(fields[f]) for f in KEY_FIELDS)


def budget() -> int:
    """Bytes of record tensors one recorder keeps in memory (``$SD3PARITY_RECORD_MEMORY``, in MB)."""
    raw = os.environ.get("SD3PARITY_RECORD_MEMORY", "128")
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < 1 << 30:
        raise ValueError(f"$SD3PARITY_RECORD_MEMORY {raw!r}: megabytes, a number >= 0")
    return int(mb * 2 ** 20)


def flat_bytes(t: Tensor) -> Tensor:
    """``t``'s elements in order as bytes (uint8), a view where ``t`` is laid out densely. A tensor whose size-1
    dimensions have stride 0 (an expanded scalar) counts as contiguous but flattens to stride 0: it is copied."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


class SpillFile:
    """An anonymous temporary file that record tensors are appended to."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="sd3parity-records-")
        self.size = 0

    def put(self, t: Tensor) -> "Spilled":
        data = memoryview(flat_bytes(t.cpu()).numpy())  # no copy
        done = 0
        while done < len(data):  # one call writes at most about 2 GB
            done += os.pwrite(self.file.fileno(), data[done:], self.size + done)
        n = t.shape[0] if t.dim() and t.shape[0] else 1
        step = len(data) // n
        sums = tuple(xxhash.xxh3_128(data[i * step: (i + 1) * step]).digest() for i in range(n))
        handle = Spilled(self, self.size, len(data), t.dtype, tuple(t.shape), sums)
        self.size += len(data)
        return handle


class Spilled:
    """A record tensor in a ``SpillFile``, with the XXH3-128 hash of each row of its first dimension (of the whole
    of a scalar): two spilled records of one dtype and shape whose rows hash alike are the same bytes (unless built
    to collide: about 2**-128), known without reading them back (``same_bytes``)."""
    __slots__ = ("spill", "offset", "nbytes", "dtype", "shape", "sums")

    def __init__(self, spill: SpillFile, offset: int, nbytes: int, dtype, shape: tuple, sums: tuple = ()):
        self.spill, self.offset, self.nbytes, self.dtype, self.shape = spill, offset, nbytes, dtype, shape
        self.sums = sums

    def rows(self, start: int, stop: int) -> "Spilled":
        """Rows ``start:stop`` of the first dimension, where they lie in the file (nothing is read)."""
        step = self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0
        start, stop = min(start, self.shape[0]), min(stop, self.shape[0])
        return Spilled(self.spill, self.offset + start * step, (stop - start) * step, self.dtype,
                       (stop - start, *self.shape[1:]), self.sums[start: stop] if stop > start else ())

    def load(self) -> Tensor:
        flat = torch.empty(self.nbytes, dtype=torch.uint8)  # read straight into the tensor's storage
        view, done = memoryview(flat.numpy()), 0
        while done < self.nbytes:
            got = os.preadv(self.spill.file.fileno(), [view[done:]], self.offset + done)
            if got <= 0:
                raise OSError(f"{self.spill.file.name}: the record spill file ended early")
            done += got
        return flat.view(self.dtype).reshape(self.shape)


class Later:
    """A record tensor being computed on another thread: ``get()`` waits for it (once), ``done()`` says whether
    it would wait. A recorder holds one until ``side()``."""
    __slots__ = ("_get", "done", "_value")

    def __init__(self, get: Callable[[], Tensor], done: Callable[[], bool]):
        self._get, self.done, self._value = get, done, None

    def get(self) -> Tensor:
        if self._value is None:
            self._value, self._get = self._get(), None
        return self._value


def load(t) -> Tensor | None:
    """A record's tensor, read back if it was spilled."""
    return t.load() if isinstance(t, Spilled) else t


def same_bytes(a, b) -> bool:
    """Whether two records are known to be the same bytes without reading them: both spilled, of one dtype and
    shape, their rows hashing alike."""
    return (isinstance(a, Spilled) and isinstance(b, Spilled) and a.dtype == b.dtype and a.shape == b.shape
            and bool(a.sums) and a.sums == b.sums)


def rows(t, start: int, stop: int):
    """Rows ``start:stop`` of a record's tensor, a spilled one left in the spill file."""
    return t.rows(start, stop) if isinstance(t, Spilled) else t[start:stop]


class Recorder:
    """Collects one side's records. ``tick()`` hands out capture times; ``put`` stores a record at a capture time
    (``at``, default now) and a position within it (``sub``: the branch of a batch), and ``side()`` returns the
    records ordered by (time, position) with ``seq`` numbered 0, 1, ... in that order."""

    def __init__(self):
        self._clock = itertools.count()
        self._items: dict[str, tuple[dict, Tensor | Spilled, tuple[int, int]]] = {}
        self._left, self._spill = budget(), None

    def tick(self) -> int:
        return next(self._clock)

    def put(self, tensor: Tensor | Spilled | Later, at: int | None = None, sub: int = 0, **fields) -> None:
        fields = {f: fields.get(f) for f in KEY_FIELDS}
        if fields["component"] == "mmdit":
            fields.update(coords(fields["layer"]))
        k = key(fields)
        if k in self._items:
            raise ValueError(f"record {k} produced twice")
        # a spilled capture stays where it is; a tensor still being computed is taken when it is done
        kept = tensor if isinstance(tensor, (Spilled, Later)) else self.keep(tensor.detach())
        self._items[k] = (fields, kept, (self.tick() if at is None else at, sub))

    def keep(self, t: Tensor, copy: bool = False) -> Tensor | Spilled:
        """``t`` as this recorder holds it: in memory (a copy of its own when it views a larger storage, or when it
        may change later: ``copy``) within the budget, else in the spill file."""
        n = t.numel() * t.element_size()
        if n <= self._left:
            self._left -= n
            return t.clone() if copy or t.untyped_storage().nbytes() > n else t
        if self._spill is None:
            self._spill = SpillFile()
        return self._spill.put(t)

    def side(self) -> Side:
        ordered = sorted(self._items.items(), key=lambda kv: kv[1][2])
        return {k: ({**fields, "seq": n}, t.get() if isinstance(t, Later) else t)
                for n, (k, (fields, t, _)) in enumerate(ordered)}


def merge(*sides: Side) -> Side:
    """Sides of consecutive parts of one run (text, then each model's image run) as one, renumbered in order."""
    out: Side = {}
    for side in sides:
        for k, (fields, t) in side.items():
            out[k] = ({**fields, "seq": len(out)}, t)
    return out


def paired(impl: Side, ref: Side, ahead: int = 2):
    """(fields, impl tensor or None, reference tensor or None) in the reference's execution order; a record only
    impl produced comes right after the record impl produced before it. Spilled records are read back on a
    thread of their own, ``ahead`` pairs before they are asked for, while the caller compares the ones before; a
    pair known to be the same bytes (``same_bytes``) is read once and given as one tensor twice."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    after: dict[str | None, list[str]] = {}
    prev = None
    for k in impl:
        if k in ref:
            prev = k
        else:
            after.setdefault(prev, []).append(k)

    def order():
        for k in after.get(None, []):
            yield impl[k][0], impl[k][1], None
        for k, (fields, want) in ref.items():
            yield fields, (impl[k][1] if k in impl else None), want
            for extra in after.get(k, []):
                yield impl[extra][0], impl[extra][1], None

    def ready(item: tuple):
        return tuple(t.result() if isinstance(t, Future) else t for t in item)

    with ThreadPoolExecutor(1, thread_name_prefix="sd3parity-records") as pool:
        queue: deque = deque()
        for fields, a, b in order():
            if same_bytes(a, b):  # impl's read back once, given for both
                a = b = pool.submit(load, a)
            queue.append((fields, *(pool.submit(load, t) if isinstance(t, Spilled) else t for t in (a, b))))
            if len(queue) > ahead:
                yield ready(queue.popleft())
        while queue:
            yield ready(queue.popleft())
