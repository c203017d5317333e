"""Streamed models: parameters read from the weight files one unit (text layer, MMDiT block, VAE stage) at a time.

A module built under ``meta_parameters()`` holds its parameters on the meta device (no memory; buffers are real).
``Pager`` then gives it weights: every parameter outside the units at once, and each unit's parameters from its
forward pre-hook until its forward hook, when they go back to the meta device. The module's own code runs
unchanged, so a reference's block is the reference's class computing on the file's values; only residency
differs from a model loaded whole. ``Weights`` reads tensors by name from safetensors files (a model folder's
shards), one tensor at a time (``pread``, no memory map). ``LazyState`` is a model's parameters as a mapping that pages units in as it is
read, for the weight records.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Weights:
    """The tensors of safetensors ``files`` by name, each read on its own with ``pread`` (no memory map: a read
    tensor is the only memory it takes, and what the page cache holds is not the process's)."""

    def __init__(self, files: Iterable[Path]):
        import struct

        from impl.weights import _header

        self.files, self._where = [Path(f) for f in files], {}
        self._fds = []
        for i, f in enumerate(self.files):
            header = _header(f)  # checked: offsets, shapes, dtypes, size
            with open(f, "rb") as fh:
                start = 8 + struct.unpack("<Q", fh.read(8))[0]
            self._fds.append(os.open(f, os.O_RDONLY))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if k in self._where:
                    raise ValueError(f"{f}: tensor {k!r} is also in {self.files[self._where[k][0]]}")
                if v["dtype"] not in DTYPES:
                    raise ValueError(f"{f}: tensor {k!r} has dtype {v['dtype']}, which is not read")
                a, b = v["data_offsets"]
                if b - a != math.prod(v["shape"]) * DTYPES[v["dtype"]].itemsize:
                    raise ValueError(f"{f}: tensor {k!r}: {b - a} bytes for shape {v['shape']} in {v['dtype']}")
                self._where[k] = (i, start + a, b - a, DTYPES[v["dtype"]], tuple(v["shape"]))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers; with ``prefix``, those whose names start with it, under
        their names without it."""
        return {k[len(prefix):]: w[4] for k, w in self._where.items() if k.startswith(prefix)}

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][3]

    def get(self, name: str) -> Tensor:
        """The tensor, in storage of its own read straight from the file (no zero-filled buffer, no copy)."""
        i, offset, n, dtype, shape = self._where[name]
        flat = torch.empty(n, dtype=torch.uint8)
        got = os.preadv(self._fds[i], [flat.numpy()], offset) if n else 0
        if got != n:
            raise ValueError(f"{self.files[i]}: tensor {name!r}: read {got} of {n} bytes (the file changed?)")
        return flat.view(dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self):
        self.close()


_NOTHING = object()  # no unit converted yet


class Converted:
    """A single file's tensors under the names a library's own converter gives them, read one unit at a time.
    ``convert(checkpoint) -> converted`` is the library's function (e.g. diffusers' single-file mapping); it runs on
    the file's tensors named ``keys`` with every tensor outside the unit being read on the meta device, so it
    computes the unit's tensors from the file and the others' names and shapes only. ``source_unit`` and
    ``target_unit`` give a file key's and a converted name's unit (None: outside every unit). A converted tensor
    of a unit that needed another unit's tensors comes out on the meta device, and is refused by name."""

    def __init__(self, w: Weights, keys: Iterable[str], convert: Callable[[dict], dict],
                 source_unit: Callable[[str], str | None], target_unit: Callable[[str], str | None], what: str):
        self.w, self.convert, self.what = w, convert, what
        self.source_unit, self.target_unit = source_unit, target_unit
        shapes = w.shapes()
        self._meta = {k: torch.empty(shapes[k], dtype=w.dtype(k), device="meta") for k in keys}
        self._unit: object = _NOTHING  # the unit converted last: a unit's name, or None for the rest
        self._tensors: dict[str, Tensor] = {}
        self.names = {k: tuple(v.shape) for k, v in convert(dict(self._meta)).items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.names)

    def get(self, name: str) -> Tensor:
        unit = self.target_unit(name)
        if self._unit != unit or name not in self._tensors:  # each unit converted once per paging in
            self._tensors = {}  # the previous unit's, freed before the next is read
            ckpt = {k: self.w.get(k) if self.source_unit(k) == unit else t for k, t in self._meta.items()}
            try:
                got = self.convert(ckpt)
            except RuntimeError as e:  # e.g. a file tensor and a meta one in one op
                raise ValueError(f"{self.what}: the converter failed on unit {unit} with the others unread "
                                 f"({str(e).splitlines()[0]}); it cannot be read one unit at a time") from None
            del ckpt
            self._tensors = {k: v for k, v in got.items() if self.target_unit(k) == unit}
            self._unit = unit
            bad = sorted(k for k, v in self._tensors.items() if v.device.type == "meta")
            if bad:
                raise ValueError(f"{self.what}: the converter computes {bad[0]} from tensors outside its unit "
                                 f"{unit}; it cannot be read one unit at a time")
        return self._tensors.pop(name)


CODES = {v: k for k, v in DTYPES.items()}


def write_tensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], get: Callable[[str], Tensor]) -> str:
    """A safetensors file written tensor by tensor: ``specs`` (name, dtype, shape) in order make the header, then
    ``get(name)`` gives each tensor in turn (at most one in memory). Returns the file's sha256."""
    import hashlib
    import json

    from parity.records import flat_bytes

    header, offset = {}, 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(raw).to_bytes(8, "little"), raw):
            f.write(chunk)
            digest.update(chunk)
        for name, dtype, shape in specs:
            t = get(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, declared {dtype} {shape}")
            data = memoryview(flat_bytes(t).numpy()) if t.numel() else b""
            f.write(data)
            digest.update(data)
    return digest.hexdigest()


def return_freed_memory() -> None:
    """Have glibc give every freed allocation of 64 KiB or more back to the system at once (``mallopt``
    M_MMAP_THRESHOLD). A streamed run frees a block's weights after each call; left to its dynamic threshold, glibc
    keeps them in its heap for reuse, and fragments of it stay resident (measured on the full-size SD3.5-Medium
    check: a peak RSS of 11.4 GB, 2.5 GB with this). No effect where there is no glibc."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


@contextlib.contextmanager
def meta_parameters():
    """Modules built inside hold their parameters on the meta device; buffers are allocated as usual."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _own(t: Tensor) -> bool:
    """Whether ``t`` is contiguous and the whole of its storage."""
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes


class Pager:
    """Weights for ``module`` (parameters on the meta device) from ``fetch(name)`` -> tensor, ``name`` a parameter
    or persistent buffer name of ``module``: everything outside ``units`` (names of submodules) now, each unit's
    parameters for the length of its forward. ``shapes``: every name ``fetch`` has, with its shape; they are
    checked against the module first (a missing, misshapen or unused tensor is refused by name, ``what`` naming
    the files; ``ignore``: stored names no parameter takes). ``dtype_of(name, parameter)``: the dtype a parameter
    takes (``parameter`` as the module built it); a unit's parameters wait on the meta device in that dtype, and
    are loaded in the dtype they have there, so ``module.to(dtype)`` applies to them as to the others. Tied parameters (one object under several names) are read once, under their first stored name.
    ``resident``: parameters inside a unit that stay loaded (one the model reads outside the unit's call).
    ``peak``: the most units resident at once; ``loads``: unit loads."""

    def __init__(self, module: nn.Module, units: Iterable[str], fetch: Callable[[str], Tensor], shapes: dict,
                 dtype_of: Callable[[str, Tensor], torch.dtype], what: str, ignore: Iterable[str] = (),
                 resident: Iterable[str] = ()):
        self.module, self.fetch, self.dtype_of, self.shapes = module, fetch, dtype_of, shapes
        self.resident_names = set(resident)
        self.units = {u: module.get_submodule(u) for u in units}
        self.resident = self.peak = self.loads = 0
        groups: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self.groups = list(groups.values())
        persistent = set(module.state_dict(keep_vars=True))
        buffers = [(n, b) for n, b in module.named_buffers() if n in persistent and n in shapes]
        self._check(buffers, what, set(ignore))
        with torch.no_grad():
            for names in self.groups:
                p = self.param(names[0])
                dtype = self.dtype_of(next(n for n in names if n in self.shapes), p)
                if self._unit(names[0]) is None:
                    self._load(names, dtype)
                else:  # on the meta device in the dtype it is loaded in (code may read a unit's dtype first)
                    self._set(names, nn.Parameter(torch.empty_like(p, dtype=dtype, device="meta"), requires_grad=False))
            for name, b in buffers:
                b.data = fetch(name).to(dtype=b.dtype)
        self._of = {u: [names for names in self.groups if self._unit(names[0]) == u] for u in self.units}
        self.pending: dict[str, list[Callable[[], None]]] = {}  # per unit: work for when it is next paged in
        for u, sub in self.units.items():
            sub.register_forward_pre_hook(lambda _m, _a, u=u: self.page_in(u))
            sub.register_forward_hook(lambda _m, _a, _o, u=u: self.page_out(u))

    def _check(self, buffers: list, what: str, ignore: set) -> None:
        used = set()
        for names in self.groups:
            source = next((n for n in names if n in self.shapes), None)
            if source is None:
                raise KeyError(f"{what}: no tensor {names[0]}")
            want = tuple(self.param(names[0]).shape)
            if tuple(self.shapes[source]) != want:
                raise ValueError(f"{what}: {source} has shape {tuple(self.shapes[source])}, the model's {want}")
            used.update(n for n in names if n in self.shapes)
        for name, b in buffers:
            if tuple(self.shapes[name]) != tuple(b.shape):
                raise ValueError(f"{what}: {name} has shape {tuple(self.shapes[name])}, the model's {tuple(b.shape)}")
            used.add(name)
        unused = sorted(set(self.shapes) - used - ignore)
        if unused:
            raise KeyError(f"{what}: tensors the model has no place for: {', '.join(unused[:5])}"
                           + (" ..." if len(unused) > 5 else ""))

    def _unit(self, name: str) -> str | None:
        if name in self.resident_names:
            return None
        return next((u for u in self.units if name.startswith(u + ".")), None)

    def _set(self, names: list[str], param: nn.Parameter) -> None:
        for name in names:
            owner, _, leaf = name.rpartition(".")
            self.module.get_submodule(owner)._parameters[leaf] = param

    def _load(self, names: list[str], dtype: torch.dtype) -> None:
        t = self.fetch(next(n for n in names if n in self.shapes)).to(dtype)
        if not _own(t):  # storage of its own (aligned, as a loaded model's own_storage gives), not a view of another
            t = t.clone(memory_format=torch.contiguous_format)
        self._set(names, nn.Parameter(t, requires_grad=False))

    def page_in(self, unit: str) -> None:
        """Loads ``unit``'s parameters, then runs the work deferred to it (``defer``)."""
        with torch.no_grad():
            for names in self._of[unit]:
                self._load(names, self.param(names[0]).dtype)  # the meta parameter's: it follows module.to(dtype)
        self.resident += 1
        self.loads += 1
        self.peak = max(self.peak, self.resident)
        for fn in self.pending.pop(unit, ()):
            fn()

    def page_out(self, unit: str) -> None:
        for names in self._of[unit]:
            owner, _, leaf = names[0].rpartition(".")
            p = self.module.get_submodule(owner)._parameters[leaf]
            self._set(names, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        self.resident -= 1

    def defer(self, unit: str, fn: Callable[[], None]) -> None:
        """``fn`` runs while ``unit`` is paged in next (its forward, or ``finish``)."""
        self.pending.setdefault(unit, []).append(fn)

    def finish(self) -> None:
        """Pages in (and out) each unit that still has deferred work, to run it."""
        for unit in list(self.pending):
            self.page_in(unit)
            self.page_out(unit)

    def summary(self, what: str) -> str:
        """What paging did, for the report's notes."""
        return f"streamed {what}: {len(self.units)} units paged in {self.loads} times, at most {self.peak} resident"

    def unit_of(self, name: str) -> str | None:
        """The unit holding parameter ``name`` (None: resident)."""
        return self._unit(name)

    def param(self, name: str) -> Tensor:
        """Parameter (or buffer) ``name`` as the module holds it now (a unit's: while it is paged in)."""
        owner, _, leaf = name.rpartition(".")
        m = self.module.get_submodule(owner)
        return m._parameters[leaf] if leaf in m._parameters else m._buffers[leaf]

    def state(self, names: Callable[[str], str] = lambda n: n) -> LazyState:
        """The module's state dict (tied parameters once, under their first name) as a ``LazyState``, renamed by
        ``names``."""
        seen, entries = set(), []
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                entries.append((names(name), self, [name], lambda parts: parts[0]))
        return LazyState(entries)


class LazyState(Mapping):
    """Parameters of paged modules under other names, read in order: ``entries`` are (name, pager, source
    parameter names, combine(tensors) -> tensor). Iterating pages each source's unit in (and the previous one
    out), so at most one unit is resident while a side records its weights."""

    def __init__(self, entries: list[tuple[str, Pager, list[str], Callable[[list[Tensor]], Tensor]]]):
        self.entries = {e[0]: e for e in entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __getitem__(self, name: str) -> Tensor:
        _, pager, sources, combine = self.entries[name]
        units = {pager.unit_of(s) for s in sources} - {None}
        for u in units:
            pager.page_in(u)
        try:
            return combine([pager.param(s).detach() for s in sources])
        finally:
            for u in units:
                pager.page_out(u)

    def record(self, put: Callable[[str, Tensor, int], None], tick: Callable[[], int]) -> None:
        """Each entry given to ``put(name, tensor, at)`` with ``at`` its place in the run's order, taken now
        (``tick``): an entry outside every unit now, a unit's while the run pages that unit in for its forward (no
        read of its own), or at the pager's ``finish``."""
        for name, (_, pager, sources, combine) in self.entries.items():
            at = tick()
            units = {pager.unit_of(s) for s in sources} - {None}
            if len(units) > 1:
                raise ValueError(f"{name}: sources in several units {sorted(units)}")

            def take(name=name, pager=pager, sources=sources, combine=combine, at=at):
                put(name, combine([pager.param(s).detach() for s in sources]), at)
            if units:
                pager.defer(units.pop(), take)
            else:
                take()

    def items(self):  # one unit in at a time, each loaded once for all its entries
        current: tuple[Pager, str] | None = None
        try:
            for name, (_, pager, sources, combine) in self.entries.items():
                units = {pager.unit_of(s) for s in sources} - {None}
                if len(units) > 1:
                    raise ValueError(f"{name}: sources in several units {sorted(units)}")
                unit = next(iter(units), None)
                if unit is not None and current != (pager, unit):
                    if current is not None:
                        current[0].page_out(current[1])
                    pager.page_in(unit)
                    current = (pager, unit)
                yield name, combine([pager.param(s).detach() for s in sources])
        finally:
            if current is not None:
                current[0].page_out(current[1])
