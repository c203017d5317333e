"""Time and peak memory of a run: per stage (a side's text part, each model's image part, teacher forcing, the
comparison of the records) and per component inside it (each text encoder, the transformer, the VAE's parts, the
weight records).

Peaks are resident set sizes (RSS) of the whole process, which is what a machine's memory limit counts. The
process's high-water mark (``VmHWM``) is read at every boundary, never reset (a reset would also lower what
``getrusage`` and ``/usr/bin/time -v`` report): where it rose inside an interval, the interval's peak is that
exact value. Elsewhere it is the most a sampler thread saw (``VmRSS`` every 2 ms), a lower bound that can miss a
shorter-lived allocation. Without ``/proc`` (not Linux) only times are kept.
"""
from __future__ import annotations

import contextlib
import threading
import time

_STATUS = "/proc/self/status"


def _status_kb() -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB, or None where there is no ``/proc``."""
    try:
        with open(_STATUS) as f:
            text = f.read()
    except OSError:
        return None
    got = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            got[line[:5]] = int(line.split()[1])
    return (got["VmRSS"], got["VmHWM"]) if len(got) == 2 else None


class _Interval:
    def __init__(self, now: tuple[int, int] | None):
        self.start = time.perf_counter()
        self.hwm0 = None if now is None else now[1]
        self.seen = 0 if now is None else now[0]  # the most RSS seen inside (KiB)

    def close(self, now: tuple[int, int] | None) -> tuple[float, float | None]:
        """(seconds, peak MiB or None)."""
        seconds = time.perf_counter() - self.start
        if now is None or self.hwm0 is None:
            return seconds, None
        peak = now[1] if now[1] > self.hwm0 else max(self.seen, now[0])
        return seconds, round(peak / 1024, 1)


class Meter:
    """Stages and the components inside them, in the order they ran. ``stage(name)`` and ``span(name)`` are
    context managers; ``watch(es, name, module)`` times a module's calls as component ``name`` until ``es``
    closes. ``stages``: [{"stage", "seconds", "peak_rss_mb", "components": [{"component", "calls", "seconds",
    "peak_rss_mb"}]}]."""

    def __init__(self, period: float = 0.002):
        self.stages: list[dict] = []
        self.period = period
        self._open: list[_Interval] = []
        self._components: dict[str, dict] | None = None

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(self.period):
            now = _status_kb()
            if now is None:
                return
            for iv in list(self._open):
                iv.seen = max(iv.seen, now[0])

    @contextlib.contextmanager
    def _sampling(self):
        """The sampler thread, for the length of an outermost stage."""
        if self._open or _status_kb() is None:
            yield
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._sample, args=(stop,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _begin(self) -> _Interval:
        iv = _Interval(_status_kb())
        self._open.append(iv)
        return iv

    def _end(self, iv: _Interval) -> tuple[float, float | None]:
        self._open.remove(iv)
        return iv.close(_status_kb())

    @contextlib.contextmanager
    def stage(self, name: str):
        outer, self._components = self._components, {}
        try:
            with self._sampling():
                iv = self._begin()
                try:
                    yield
                finally:
                    seconds, peak = self._end(iv)
        finally:
            comps, self._components = self._components, outer
        self.stages.append({"stage": name, "seconds": round(seconds, 3), "peak_rss_mb": peak,
                            "components": list(comps.values())})

    def skipped(self, name: str) -> None:
        """A stage whose result was computed before (no time, no memory of its own)."""
        self.stages.append({"stage": name, "seconds": 0.0, "peak_rss_mb": None, "components": []})

    def _add(self, name: str, seconds: float, peak: float | None) -> None:
        if self._components is None:
            return
        c = self._components.setdefault(name, {"component": name, "calls": 0, "seconds": 0.0, "peak_rss_mb": None})
        c["calls"] += 1
        c["seconds"] = round(c["seconds"] + seconds, 3)
        if peak is not None:
            c["peak_rss_mb"] = max(c["peak_rss_mb"] or 0.0, peak)

    @contextlib.contextmanager
    def span(self, name: str):
        iv = self._begin()
        try:
            yield
        finally:
            self._add(name, *self._end(iv))

    def watch(self, es: contextlib.ExitStack, name: str, module) -> None:
        """Every call of ``module`` (its forward, hooks included) counted as component ``name``."""
        running: list[_Interval] = []

        def pre(_m, _args):
            running.append(self._begin())

        def post(_m, _args, _out):
            if running:
                self._add(name, *self._end(running.pop()))
        es.callback(module.register_forward_pre_hook(pre).remove)
        es.callback(module.register_forward_hook(post, always_call=True).remove)


_current: Meter | None = None


@contextlib.contextmanager
def metering(meter: Meter):
    """``meter`` is the one ``span`` and ``watch`` below report to, for the length of the block."""
    global _current
    outer, _current = _current, meter
    try:
        yield meter
    finally:
        _current = outer


def span(name: str):
    """Times the block as component ``name`` of the current stage (nothing when no run is metered)."""
    return _current.span(name) if _current is not None else contextlib.nullcontext()


def watch(es: contextlib.ExitStack, name: str, module) -> None:
    """Times ``module``'s calls as component ``name`` of the current stage (nothing when no run is metered)."""
    if _current is not None:
        _current.watch(es, name, module)


def table(stages: list[dict]) -> list[str]:
    """The report's lines: each stage, then its components, with seconds, calls and peak RSS."""
    def gb(mb):
        return "       -" if mb is None else f"{mb / 1024:6.2f} GB"
    lines = [f"  {'stage / component':<34} {'seconds':>9} {'calls':>6} {'peak RSS':>9}"]
    for s in stages:
        lines.append(f"  {s['stage']:<34} {s['seconds']:9.2f} {'':>6} {gb(s['peak_rss_mb'])}")
        lines += [f"    {c['component']:<32} {c['seconds']:9.2f} {c['calls']:6d} {gb(c['peak_rss_mb'])}"
                  for c in s["components"]]
    return lines
