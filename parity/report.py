"""The comparison of two sides' records under one tolerance rule, and its text and JSON forms."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parity import records as R
from parity.metrics import compare

WHERE_FIELDS = ("model", "prompt", "component", "layer", "step", "branch", "block", "stream")


@dataclass
class Report:
    model: str
    profile: str
    reference: str
    dtype: str
    flags: dict[str, Any]
    threads: int
    max_ulp: int
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, Any] = field(default_factory=dict)  # what each side read (files, code fingerprints)
    warnings: list[str] = field(default_factory=list)  # suspect inputs (dtype casts, NaN / Inf weights)
    max_abs: float | None = None  # also within tolerance: a max abs error at most this (compare-dumps --max-abs)
    mode: str = "propagated"  # "teacher-forced": records are impl's units on the reference's inputs; "both"
    versions: dict[str, str] = field(default_factory=dict)  # python, torch and the reference libraries
    sides: tuple | None = field(default=None, repr=False)  # the two compared sides' records (for the HTML report)
    text_dir: Any = None  # the model directory whose tokenizer folders name the ids (for the HTML report)
    resources: dict = field(default_factory=dict)  # peak RSS of the process and seconds per stage

    @property
    def nonfinite(self) -> list[dict]:
        """Records where either side holds NaN or Inf: equal bits there are not agreement on a number."""
        return [r for r in self.records if sum(r.get("nan", ())) + sum(r.get("inf", ())) > 0]

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.records if not r["ok"]]

    @property
    def introduced(self) -> list[dict]:
        """Records where impl introduces an error: its unit, run on the reference's inputs, exceeds the tolerance
        (teacher forcing; in that mode alone, every failure)."""
        if self.mode == "teacher-forced":
            return self.failures
        return [r for r in self.records if "local" in r and not r["local"]["ok"]]

    @property
    def first_divergence(self) -> dict | None:
        """The first record, in the reference's execution order, that is not bitwise equal."""
        return next((r for r in self.records if not r["bitwise_equal"]), None)

    def add_pairs(self, impl: R.Side, ref: R.Side, noise: dict | None = None, tolerance: str = "ulp",
                  local: R.Side | None = None) -> None:
        """Compare every record of the two sides, in the reference's execution order (``records.paired``). With
        ``noise`` (record key -> the reference's own jitter), each record carries it, a divergent record its cause
        class, and ``tolerance="noise"`` accepts an error within that jitter. With ``local`` (impl's teacher-forced
        records, ``parity.teacher``), each record also carries its local error (``local``)."""
        def within(m: dict, floor: dict | None) -> bool:
            return m.get("bitwise_equal", False) or "shape_mismatch" not in m and "dtype_mismatch" not in m and (
                m["max_abs_err"] <= floor["max_abs"] if tolerance == "noise" and floor is not None
                else m["max_ulp"] <= self.max_ulp or self.max_abs is not None and m["max_abs_err"] <= self.max_abs)

        for fields, got, want in R.paired(impl, ref):
            base = {k: fields.get(k) for k in WHERE_FIELDS} | {"seq": len(self.records)}
            if got is None or want is None:  # one side did not produce it (a different number of calls, ...)
                self.records.append({**base, "shape": [], "dtype": "", "ok": False, "bitwise_equal": False,
                                     "shape_mismatch": "only the reference has it" if got is None else "only impl has it",
                                     "cause": "structure (a record only one side computes)"})
                continue
            m = compare(got, want)
            floor = None if noise is None else noise.get(R.key(fields))
            if floor is not None:
                m["noise"] = floor
            r = {**base, "shape": list(got.shape), "dtype": str(got.dtype).removeprefix("torch."),
                 "ok": bool(within(m, floor)), **m}
            mine = None if local is None else local.get(R.key(fields))
            if mine is not None:
                lm = compare(R.load(mine[1]), want)
                r["local"] = {k: lm[k] for k in ("bitwise_equal", "max_abs_err", "max_ulp", "cosine", "shape_mismatch")
                              if k in lm} | {"ok": bool(within(lm, floor))}
            if not r["bitwise_equal"]:
                r["cause"] = cause(r, noise is not None)
            self.records.append(r)

    def to_json(self) -> dict:
        fd = self.first_divergence
        return {"model": self.model, "profile": self.profile, "reference": self.reference, "dtype": self.dtype,
                "threads": self.threads, "flags": dict(self.flags), "tolerance": {"max_ulp": self.max_ulp, "max_abs": self.max_abs},
                "versions": self.versions, "resources": self.resources, "sources": self.sources, "notes": self.notes, "warnings": self.warnings + _nonfinite_warning(self),
                "n_nonfinite": len(self.nonfinite), "n_records": len(self.records),
                "n_failed": len(self.failures), "mode": self.mode,
                "introduced": [r["seq"] for r in self.introduced] if self.mode != "propagated" else None,
                "first_divergence": None if fd is None else {k: fd[k] for k in ("seq", *WHERE_FIELDS) if k in fd},
                "records": self.records}


def _where(r: dict) -> str:
    """Text records: the prompt index; image records: model, step and branch; parameters: the model."""
    if R.is_weight(r):
        return (r["model"] or "").removeprefix("embedded-")
    if r["component"] in ("mmdit", "sampler", "vae"):
        step = "" if r.get("step") is None else f" s{r['step']}"
        return f"{(r['model'] or '').removeprefix('embedded-')}{step} {r.get('branch') or ''}".rstrip()
    return f"p{r['prompt']}"


def _size(r: dict) -> str:
    """max abs, max relative error, cosine, and ULPs where they mean something: not across a sign flip (where the
    count is of the whole range between the two values, ~2e9 for float32) nor for non-finite values."""
    if r.get("shape_mismatch"):
        return f"{'shape ' + r['shape_mismatch']:>38}"
    nonfinite = sum(r.get("nan", ())) + sum(r.get("inf", ()))
    ulp = "sign" if r.get("sign_flips") else "nan/inf" if nonfinite and not r["bitwise_equal"] else r["max_ulp"]
    if "cosine" not in r:  # integer records (ids, the uint8 image): differences only
        return f"{r['max_abs_err']:>10.3g} {'-':>9} {'-':>9} {ulp:>8}"
    return f"{r['max_abs_err']:>10.3g} {r.get('max_rel_err', 0):>9.3g} {r['cosine']:>9.6f} {ulp:>8}"


def _local(r: dict) -> str:
    """The local (teacher-forced) error of a record: ``=`` when bitwise equal, ``-`` where no unit computes it."""
    lm = r.get("local")
    if lm is None:
        return "-"
    if lm.get("shape_mismatch"):
        return "shape"
    return "=" if lm["bitwise_equal"] else f"{lm['max_abs_err']:.3g}"


def cause(r: dict, measured: bool) -> str:
    """The class of a divergent record, from what it is and, for ops, the reference's own jitter there (the
    error here may be inherited from an earlier record: the first divergence is where it is introduced)."""
    if R.is_weight(r):
        return "weight loading"
    if r["layer"] == "input_ids":
        return "tokenization (ids differ)"
    if r.get("shape_mismatch") or r.get("dtype_mismatch"):
        return "structure (shape or dtype)"
    if "local" in r and r["local"]["ok"] and not r["ok"]:
        return "inherited (on the reference's input impl adds no error beyond tolerance here)"
    if r["component"] == "sampler":
        return "scheduler / RNG / guidance"
    if not measured:
        return "op semantics or precision (--noise-floor tells them apart)"
    floor = r.get("noise")
    size = r["local"]["max_abs_err"] if "max_abs_err" in r.get("local", {}) else r["max_abs_err"]
    if floor is not None and size <= floor["max_abs"]:
        return "precision (within the reference's own jitter)"
    return "op semantics (above the reference's own jitter)"


def _nonfinite_warning(report: Report) -> list[str]:
    bad = report.nonfinite
    if not bad:
        return []
    r = bad[0]
    return [f"{len(bad)} records hold NaN or Inf, first #{r['seq']} {_where(r)} {r['component']} {r['layer']} "
            f"(impl NaN {r['nan'][0]} Inf {r['inf'][0]}, reference NaN {r['nan'][1]} Inf {r['inf'][1]}): equal bits "
            "there are not agreement on a number"]


def verdict(report: Report) -> str:
    n, bad = len(report.records), len(report.failures)
    fd = report.first_divergence
    lines = [f"{n} records, {n - bad} within tolerance, {bad} exceed it"
             + (" (teacher-forced: impl's units on the reference's inputs)" if report.mode == "teacher-forced" else "")]
    if fd is None:
        held = f"; {len(report.nonfinite)} hold NaN or Inf, see the warning" if report.nonfinite else ""
        lines.append(f"first divergence: none (every record bitwise equal{held})")
    else:
        extra = f", dtype {fd['dtype_mismatch']}" if "dtype_mismatch" in fd else ""
        size = (f"shape {fd['shape_mismatch']}" if fd.get("shape_mismatch") else
                f"max_abs {fd.get('max_abs_err', float('nan')):.3g}, "
                + (f"max_rel {fd.get('max_rel_err', 0):.3g}, cosine {fd['cosine']:.6f}, " if "cosine" in fd else "")
                + (f"{fd['sign_flips']} sign flips" if fd.get("sign_flips") else f"ulp {fd.get('max_ulp', '-')}")
                + extra)
        lines.append(f"first divergence: #{fd['seq']} {_where(fd)} {fd['component']} {fd['layer']} ({size})")
        lines.append(f"cause: {fd['cause']}" + (f"; the reference's own jitter there: max_abs "
                                                  f"{fd['noise']['max_abs']:.3g}" if fd.get("noise") else ""))
    if report.mode == "both":
        lines.append(_introduced(report))
    lines += [f"warning: {w}" for w in report.warnings + _nonfinite_warning(report)]
    return "\n".join(lines)


def _introduced(report: Report, show: int = 5) -> str:
    """Where error is introduced: the records whose local (teacher-forced) error exceeds the tolerance."""
    rows = report.introduced
    if not rows:
        return "introduced at: nowhere (on the reference's inputs every impl unit is within tolerance)"
    named = ", ".join(f"#{r['seq']} {_where(r)} {r['component']} {r['layer']} (local max_abs "
                      f"{r['local'].get('max_abs_err', float('nan')):.3g})" for r in rows[:show])
    inherit = sum(1 for r in report.failures if r.get("local", {}).get("ok"))
    return (f"introduced at: {len(rows)} record(s): {named}" + (" ..." if len(rows) > show else "")
            + f"; {inherit} exceed the tolerance only by inheritance")


def format_table(report: Report, prompts: list[str], quiet: bool = False) -> str:
    """The verdict first, then (unless ``quiet``) the table, what each side read, notes, and the verdict again."""
    if quiet:
        return verdict(report)
    tolerance = f"tolerance max_ulp={report.max_ulp}" + (
        f" or max_abs<={report.max_abs:g}" if report.max_abs is not None else "")
    lines = [verdict(report), "",
             f"dump {report.model} against dump {report.reference}  {tolerance}" if report.profile == "dump" else
             f"model {report.model}  profile {report.profile}  reference {report.reference}  dtype {report.dtype}  "
             f"threads {report.threads}  {tolerance}  mode {report.mode}", ""]
    both = report.mode == "both"
    head = (f"{'seq':>5} {'where':<22} {'component':<12} {'layer':<36} {'shape':<16} {'max_abs':>10} {'max_rel':>9} "
            f"{'cosine':>9} {'ulp':>8}" + (f" {'local':>10}" if both else "") + "  bitwise")
    lines += [head, "-" * len(head)]
    weights = [r for r in report.records if R.is_weight(r)]
    for r in report.records:
        if r["bitwise_equal"] and R.is_weight(r):
            continue  # equal parameters: counted below, not listed
        mark = "yes" if r["bitwise_equal"] else ("no" if r["ok"] else "NO  <-- exceeds tolerance")
        if sum(r.get("nan", ())) + sum(r.get("inf", ())):
            mark += "  (NaN/Inf)"
        if both and r.get("local", {}).get("ok") is False:
            mark += "  <-- introduced here"
        lines.append(f"{r['seq']:>5} {_where(r):<22} {r['component']:<12} {r['layer']:<36} "
                     f"{'x'.join(map(str, r['shape'])):<16} {_size(r)}" + (f" {_local(r):>10}" if both else "")
                     + f"  {mark}")
        if r.get("reference_name"):
            lines.append(f"{'':>5} {'':<22} {'':<12} {report.reference} name: {r['reference_name']}")
    lines.append("")
    if weights:
        same = sum(r["bitwise_equal"] for r in weights)
        lines.append(f"weights: {len(weights)} parameters compared before any activation, {same} bitwise equal"
                     + ("" if same == len(weights) else f", {len(weights) - same} differ (listed above)"))
    for name, what in report.sources.items():
        if report.profile == "dump":
            p = what.get("producer", {})
            lines.append(f"{name}: produced by " + " ".join(str(p[k]) for k in ("name", "side", "version") if k in p))
            continue
        files = what.get("files", {}) if isinstance(what, dict) else {}
        rest = {k: v for k, v in what.items() if k != "files"} if isinstance(what, dict) else what
        lines.append(f"{name} read: {len(files)} weight files" + (f", {rest}" if rest else ""))
        lines += [f"  {path}  {digest[:12]}" for path, digest in files.items()]
    lines += [f"note: {n}" for n in report.notes]
    if report.resources:
        from parity.resources import table

        r = report.resources
        lines.append(f"resources: peak RSS {r['peak_rss_mb'] / 1024:.2f} GB (the process)")
        lines += table(r.get("stages") or [{"stage": what, "seconds": t, "peak_rss_mb": None, "components": []}
                                           for what, t in r["seconds"]])
    lines += [f"prompt {i}: " + (repr(p) if isinstance(p, str) else
                                 ", ".join(f"{k} {x!r}" for k, x in zip(("clip-l", "clip-g", "t5"), p)))
              for i, p in enumerate(prompts)]
    return "\n".join(lines + ["", verdict(report)])


def markdown(report: Report) -> str:
    """A summary that fits a CI job summary: the verdict, records per component, the first divergence, the
    warnings, and what each side read (versions, code and file fingerprints)."""
    fd, bad = report.first_divergence, report.failures
    head = "PASS" if not bad else "FAIL"
    lines = [f"## sd3-parity check: {head}", "",
             f"impl against **{report.reference}**, profile `{report.profile}`, model `{report.model}`, dtype "
             f"`{report.dtype}`, {report.threads} thread(s), tolerance max_ulp={report.max_ulp}", "",
             "| component | records | bitwise equal | exceed tolerance | largest max_abs |", "|---|---:|---:|---:|---:|"]
    comps: dict[str, list[dict]] = {}
    for r in report.records:
        comps.setdefault(("weights " if R.is_weight(r) else "") + r["component"], []).append(r)
    for comp, rs in comps.items():
        worst = max((r.get("max_abs_err", 0.0) for r in rs if not r.get("shape_mismatch")), default=0.0)
        lines.append(f"| {comp} | {len(rs)} | {sum(r['bitwise_equal'] for r in rs)} | {sum(not r['ok'] for r in rs)} "
                     f"| {worst:.3g} |")
    lines.append("")
    if fd is None:
        lines.append("First divergence: none, every record bitwise equal.")
    else:
        size = (f"shape {fd['shape_mismatch']}" if fd.get("shape_mismatch") else
                f"max abs {fd.get('max_abs_err', 0):.3g}" + (f", cosine {fd['cosine']:.6f}" if "cosine" in fd else ""))
        lines.append(f"First divergence: `#{fd['seq']} {_where(fd)} {fd['component']} {fd['layer']}` ({size})"
                     + (f", {report.reference} name `{fd['reference_name']}`" if fd.get("reference_name") else ""))
    if report.mode == "both":
        lines += ["", _introduced(report).replace("introduced at:", "Introduced at (teacher forcing):", 1)]
    warnings = report.warnings + _nonfinite_warning(report)
    if warnings:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in warnings]
    lines += ["", "<details><summary>what each side read</summary>", ""]
    for name, what in report.sources.items():
        what = what if isinstance(what, dict) else {"": what}
        extra = ", ".join(f"{k} {v}" for k, v in what.items() if k != "files" and not isinstance(v, dict))
        lines.append(f"- **{name}**" + (f": {extra}" if extra else ""))
        for k, v in what.items():
            if isinstance(v, dict) and k != "files":
                lines.append(f"  - {k}: " + ", ".join(f"{a} `{str(b)[:16]}`" for a, b in v.items()))
        lines += [f"  - `{path}` `{digest[:12]}`" for path, digest in what.get("files", {}).items()]
    lines += ["", "</details>", ""]
    return "\n".join(lines)
