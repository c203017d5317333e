"""``sd3parity explain``: the smallest set of flag values (known quirks) that removes a divergence, and what each
of them moves.

The run is a ``check`` (impl with its flag values against the profile's reference). When it diverges, the search
changes flag values of impl only, with the reference computed once (``run.execute`` with a cache):

1. candidates: every other value of every flag (``--between A B``: the flags on which profiles A and B differ, set
   to B's value, with B's reference: "which quirks separate A from B?");
2. greedy stages: each stage adds the candidate that moves the first divergence furthest (a later record, or
   fewer failing records); a stage first tries the values that changed anything in the last full round, then, if
   none helps, every value (a value can be masked by another difference, e.g. T5 states of another length); when
   no single one helps, pairs are tried, so two quirks that only together fix a record are found;
3. minimisation: a flag value whose removal keeps the run clean is dropped, so the set is minimal (no member can
   go), though not necessarily the smallest possible.

For each member of the set, the run without it says what it moves: its first divergence, and the max abs error
on the final latent and the image. A flag whose value also changes the reference's run (``t5_max_length``,
``shift``) is changed on both sides, as ``--flag`` does in ``check``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from parity import flags as F

SETTINGS = ("t5_max_length", "sampler")  # flags the references read as run settings: never searched, kept as given
SIDE_SETTINGS = {"comfyui": ("schedule",)}  # and those one reference reads too (ComfyUI's KSampler scheduler)


def settings(profile: str) -> tuple[str, ...]:
    return SETTINGS + SIDE_SETTINGS.get(profile, ())
MAX_STAGES = 8
MAX_PAIRS = 300  # pair trials per stage, at most


@dataclass
class Trial:
    values: tuple[tuple[str, object], ...]  # the flag values changed from the start
    report: object  # parity.report.Report

    @property
    def signature(self) -> tuple:
        """What the run computed, in short: a value that changes nothing leaves it as it was."""
        r = self.report
        return (len(r.failures), r.first_divergence and r.first_divergence["seq"],
                round(sum(x.get("max_abs_err") or 0.0 for x in r.records), 12))

    @property
    def score(self) -> tuple:
        """Larger is better: no divergence; else a later first divergence; else fewer failing records."""
        fd = self.report.first_divergence
        if not self.report.failures:
            return (1, 0, 0)
        return (0, fd["seq"] if fd else 0, -len(self.report.failures))


def candidates(start: dict, between: str | None, image: bool, profile: str) -> list[tuple[str, object]]:
    target = F.profile_values(between) if between else None
    out = []
    for f in F.FLAGS:
        if (f.side == "image" and not image) or f.name in settings(profile):
            continue
        values = [target[f.name]] if target is not None else list(f.choices)
        out += [(f.name, v) for v in values if v != start[f.name]]
    return out


def explain(spec, between: tuple[str, str] | None = None, progress=None) -> dict:
    """Search for the flag values that remove the divergence of ``spec`` (see the module docstring)."""
    from parity.run import check, flag_values, with_overrides

    if between is not None:
        a, b = between
        impl_a = {k: v for k, v in F.profile_values(a).items() if k not in settings(b)}
        spec = replace(spec, profile=b, overrides=tuple(sorted({**impl_a, **dict(spec.overrides)}.items())))
    cache: dict = {}
    runs = 0

    def run(values: tuple) -> Trial:
        nonlocal runs
        runs += 1
        if progress:
            progress(runs, values)
        return Trial(values, check(with_overrides(spec, **dict(values)), cache))

    start_values = flag_values(spec)
    base = run(())
    out = {"profile": spec.profile, "between": list(between) if between else None, "start": _summary(base.report),
           "report": base.report}  # the run as given (for the HTML report; not part of the JSON result)
    if not base.report.failures:
        return {**out, "found": [], "runs": runs, "verdict": "nothing to explain: no record exceeds the tolerance"}
    pool = candidates(start_values, between[1] if between else None, not spec.text_only, spec.profile)
    current, active = base, None
    for _ in range(MAX_STAGES):
        if not current.report.failures:
            break
        used = {n for n, _ in current.values}
        free = [c for c in pool if c[0] not in used]
        best = None
        for subset in ([c for c in free if c in active] if active is not None else None, free):
            if subset is None or (best is not None and best.score > current.score):
                continue
            trials = [run(current.values + (c,)) for c in subset]
            if subset is free:  # the values that change nothing now are left out of the next stage's first try
                active = {c for c, t in zip(subset, trials) if t.signature != current.signature}
            best = max([t for t in trials] + ([best] if best else []), key=lambda t: t.score, default=None)
        if best is None or best.score <= current.score:
            pairs = [p for p in itertools.combinations(free, 2) if p[0][0] != p[1][0]][:MAX_PAIRS]
            trials = [run(current.values + p) for p in pairs]
            best = max(trials, key=lambda t: t.score, default=None)
            if best is None or best.score <= current.score:
                break
        current = best
    if current.report.failures:
        return {**out, "found": None, "runs": runs, "closest": list(map(list, current.values)),
                "closest_result": _summary(current.report),
                "verdict": "no set of flag values removes the divergence: it is not (only) a known quirk"}
    found = list(current.values)
    for item in list(found):  # minimal: drop what is not needed
        rest = tuple(v for v in found if v != item)
        if not run(rest).report.failures:
            found = list(rest)
    effects = []
    for item in found:
        without = run(tuple(v for v in found if v != item))
        effects.append({"flag": item[0], "value": item[1], "start_value": start_values[item[0]],
                        "without_it": _summary(without.report)})
    return {**out, "found": [list(v) for v in found], "effects": effects, "runs": runs,
            "verdict": "removed by " + ", ".join(f"{n}={v!r}" for n, v in found)}


def _summary(report) -> dict:
    fd = report.first_divergence
    last = {}
    for r in report.records:  # the last latent and the image of the first model, by max abs
        if r["component"] == "sampler" and r["layer"] == "latent" or r["layer"] == "image_uint8":
            last[r["layer"]] = r.get("max_abs_err")
    return {"failed": len(report.failures), "records": len(report.records),
            "first_divergence": None if fd is None else " ".join(
                str(fd[k]) for k in ("model", "prompt", "component", "layer", "step", "branch") if fd.get(k) is not None),
            "latent_max_abs": last.get("latent"), "image_max_abs": last.get("image_uint8")}


def format_explain(result: dict) -> str:
    lines = [result["verdict"], ""]
    s = result["start"]
    lines.append(f"as run: {s['failed']} of {s['records']} records exceed the tolerance; first divergence "
                 f"{s['first_divergence']}")
    if result.get("found"):
        lines.append(f"with {', '.join(f'{n}={v!r}' for n, v in result['found'])}: every record within tolerance")
        lines.append("")
        lines.append("what each one moves (the run with all the others but not this one):")
        for e in result["effects"]:
            w = e["without_it"]
            lines.append(f"  {e['flag']}={e['value']!r} (was {e['start_value']!r}): without it {w['failed']} records "
                         f"exceed, first {w['first_divergence']}"
                         + (f"; latent max abs {w['latent_max_abs']:.3g}" if w["latent_max_abs"] is not None else "")
                         + (f"; image max abs {w['image_max_abs']:.3g}" if w["image_max_abs"] is not None else ""))
    elif result.get("found") is None and "closest" in result:
        c = result["closest_result"]
        lines.append(f"closest: {result['closest']}: {c['failed']} records still exceed, first {c['first_divergence']}")
    lines.append(f"({result['runs']} impl runs; the reference was computed once per distinct reference setting)")
    return "\n".join(lines)
