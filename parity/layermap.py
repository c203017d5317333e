"""Hook-based capture of the points a naming table maps, with the time of each capture.

``capture(model, where, store, clock)`` hooks every module ``where`` names and appends ``(time, tensor)`` to
``store[record]`` at every call (a module called twice, e.g. for two prompts or two steps, gives two entries);
``time`` comes from ``clock`` (a side's ``Recorder.tick``), so records keep the order in which they were computed.
``keep`` (a side's ``Recorder.keep``) decides where a captured copy lives: memory, or the spill file past the
records' memory budget (read back with ``records.load``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

from torch import Tensor, nn

from parity.naming import At


def _first_tensor(x):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    if hasattr(x, "sample") and isinstance(x.sample, Tensor):  # diffusers' output dataclasses
        return x.sample
    raise TypeError(f"capture point returned {type(x).__name__}, not a tensor")


def read(reads: str, args: tuple, out) -> Tensor:
    if reads.startswith(("output.", "input.")):
        return (out if reads.startswith("output.") else args)[int(reads.split(".")[1])]
    return _first_tensor(args if reads == "input" else out)


@contextlib.contextmanager
def capture(model: nn.Module, where: dict[str, At], store: dict[str, list], clock: Callable[[], int],
            keep: Callable = lambda t: t.clone()):
    modules = dict(model.named_modules())
    handles = []
    for name, at in where.items():
        if at.reads.startswith("input"):  # read when the module is called: that is when the value exists
            def pre(_m, args, name=name, reads=at.reads):
                store.setdefault(name, []).append((clock(), keep(read(reads, args, None).detach())))
            handles.append(modules[at.module].register_forward_pre_hook(pre))
        else:
            def hook(_m, args, out, name=name, reads=at.reads):
                store.setdefault(name, []).append((clock(), keep(read(reads, args, out).detach())))
            handles.append(modules[at.module].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
