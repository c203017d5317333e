"""One self-contained HTML report (no network at view time: plots and images are inline PNGs, the style inline):
the verdict, error against depth per step and stream (accumulated and, with teacher forcing, local), the latent
error per step, the decoded images and their difference heat map, the token and padding view per encoder, the
explain result, the differing records, and the versions and files each side read. Plots by matplotlib, the page
by a Jinja2 template (``parity/templates/report.html``)."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from parity import records as R
from parity.report import Report, _local, _where, verdict

BLOCK = re.compile(r"block\.(\d+)\.(x|context)$")
TEXT_LAYER = re.compile(r"(?:layers|block)\.(\d+)$")
MAX_ROWS, MAX_TOKENS = 400, 120
FLOOR = 1e-9  # the symlog plots' linear range: smaller errors (and 0, bitwise equal) sit at the bottom


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _figure(n: int = 1, width: float = 11.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 3.2))
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]


def _lines(ax, series: dict, xlabel: str) -> None:
    """``series``: label -> (xs, accumulated, local or None)."""
    colors = [f"C{i % 10}" for i in range(len(series))]
    for color, (label, (xs, acc, loc)) in zip(colors, sorted(series.items())):
        ax.plot(xs, acc, "-o", color=color, markersize=3, label=label)
        if loc is not None and any(v is not None for v in loc):
            ax.plot(xs, [0.0 if v is None else v for v in loc], "--", color=color, alpha=0.7)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("symlog", linthresh=FLOOR)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("max abs error")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def _size(r: dict):
    return 0.0 if r.get("shape_mismatch") else r.get("max_abs_err", 0.0)


def _local_size(r: dict):
    lm = r.get("local")
    return None if lm is None or lm.get("shape_mismatch") else lm.get("max_abs_err")


def depth_plots(report: Report) -> list[dict]:
    figs = []
    image: dict[str, dict] = {}
    for r in report.records:
        m = BLOCK.match(r["layer"])
        if r["component"] == "mmdit" and m and r.get("branch") == "cond":
            image.setdefault(r["model"], {}).setdefault(m.group(2), {}).setdefault(
                f"step {r['step']}", []).append((int(m.group(1)), _size(r), _local_size(r)))
    for model, streams in image.items():
        fig, axes = _figure(2)
        for ax, stream in zip(axes, ("x", "context")):
            series = {k: tuple(map(list, zip(*sorted(v)))) for k, v in streams.get(stream, {}).items()}
            _lines(ax, {k: (xs, acc, loc) for k, (xs, acc, loc) in series.items()}, "joint block")
            ax.set_title(f"{'image' if stream == 'x' else 'context'} stream (cond branch)", fontsize=10)
        figs.append({"png": _png(fig), "caption": f"{model}: MMDiT blocks, per step"})
    text: dict[str, dict] = {}
    for r in report.records:
        m = TEXT_LAYER.match(r["layer"])
        if r["component"] in ("clip-l", "clip-g", "t5") and m:
            text.setdefault(r["component"], {}).setdefault(f"prompt {r['prompt']}", []).append(
                (int(m.group(1)), _size(r), _local_size(r)))
    if text:
        fig, axes = _figure(len(text))
        for ax, (comp, prompts) in zip(axes, text.items()):
            _lines(ax, {k: tuple(map(list, zip(*sorted(v)))) for k, v in prompts.items()}, "layer")
            ax.set_title(comp, fontsize=10)
        figs.append({"png": _png(fig), "caption": "text encoders: each layer's output, per prompt"})
    return figs


def step_plots(report: Report) -> list[dict]:
    per: dict[str, list] = {}
    for r in report.records:
        if r["component"] == "sampler" and r["layer"] == "latent":
            per.setdefault(r["model"], []).append((r["step"], _size(r), _local_size(r)))
    if not per:
        return []
    fig, (ax,) = _figure(1, 7.0)
    _lines(ax, {m: tuple(map(list, zip(*sorted(v)))) for m, v in per.items()}, "step")
    ax.set_title("latent after each step (dashed: the step alone, on the reference's latent)", fontsize=10)
    return [{"png": _png(fig), "caption": "latent error per step"}]


def _image_png(arr) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_views(report: Report, sides) -> list[dict]:
    import numpy as np

    if sides is None:
        return []
    impl, ref = sides
    out = []
    for k, (fields, t) in ref.items():
        if fields["layer"] != "image_uint8" or k not in impl:
            continue
        a, b = R.load(impl[k][1]).numpy(), R.load(t).numpy()
        if a.shape != b.shape:
            continue
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)
        fig, (ax,) = _figure(1, 4.6)
        shown = ax.imshow(diff, cmap="magma", vmin=0, vmax=max(1, int(diff.max())), interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_axis_off()
        out.append({"model": fields["model"], "impl": _image_png(a), "ref": _image_png(b), "diff": _png(fig),
                    "caption": f"|impl - reference|, max over channels: max {int(diff.max())}, "
                               f"{int((diff > 0).sum())} of {diff.size} pixels differ"})
    return out


def vocabularies(directory: Path | None) -> dict:
    """id -> token text per encoder, from the model's tokenizer folders (empty where they cannot be read)."""
    out: dict[str, dict] = {}
    if directory is None:
        return out
    try:
        vocab = json.loads((directory / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
        out["clip-l"] = out["clip-g"] = {v: k.replace("</w>", "_") for k, v in vocab.items()}
    except (OSError, ValueError):
        pass
    try:
        from impl.t5_tokenizer import SentencePieceModel

        out["t5"] = {i: p[0] for i, p in enumerate(SentencePieceModel.load(directory / "tokenizer_3" /
                                                                             "spiece.model").pieces)}
    except (OSError, ValueError):
        pass
    return out


def token_views(sides, vocab: dict) -> list[dict]:
    if sides is None:
        return []
    impl, ref = sides
    out = []
    for k, (fields, t) in ref.items():
        if fields["layer"] != "input_ids":
            continue
        b = R.load(t).tolist()
        a = R.load(impl[k][1]).tolist() if k in impl else []
        names = vocab.get(fields["component"], {})
        n = max(len(a), len(b))
        differ = [i for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]]
        show = sorted({i for i in range(min(n, 24))} | set(differ))[:MAX_TOKENS]

        def cells(ids):
            return [{"id": ids[i] if i < len(ids) else "", "text": names.get(ids[i], "") if i < len(ids) else "",
                     "cls": "diff" if i in differ else ""} for i in show]
        summary = (f"{len(a)} and {len(b)} ids" if len(a) != len(b) else f"{n} ids") + \
            (f", {len(differ)} positions differ" if differ else ", all equal")
        out.append({"prompt": fields["prompt"], "encoder": fields["component"], "positions": show,
                    "impl": cells(a), "ref": cells(b), "summary": summary,
                    "more": f"{n - len(show)} more positions, all equal" if n > len(show) else ""})
    return out


def _rows(report: Report) -> tuple[list[dict], str]:
    rows = [r for r in report.records if not r["bitwise_equal"]]
    out = []
    for r in rows[:MAX_ROWS]:
        size = r.get("shape_mismatch") and f"shape {r['shape_mismatch']}"
        out.append({"seq": r["seq"], "where": _where(r), "component": r["component"], "layer": r["layer"],
                    "max_abs": size or f"{r.get('max_abs_err', 0):.3g}",
                    "max_rel": "" if size or "max_rel_err" not in r else f"{r['max_rel_err']:.3g}",
                    "cosine": "" if size or "cosine" not in r else f"{r['cosine']:.6f}", "local": _local(r),
                    "cause": r.get("cause", ""), "ok": r["ok"]})
    more = f"{len(rows) - MAX_ROWS} more records differ (see the JSON report)" if len(rows) > MAX_ROWS else ""
    return out, more


def template(name: str):
    """A page template of ``parity/templates`` (HTML-escaped values)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("parity", "templates"), autoescape=True)
    return env.get_template(name)


def render(report: Report, sides=None, text_dir: Path | None = None, explain: str | None = None,
           kind: str = "check") -> str:
    """The HTML page of ``report``; ``sides``: the two compared sides' records (images and ids), ``text_dir``:
    the model directory whose tokenizer folders name the ids, ``explain``: the explain result as text."""
    depth, steps = depth_plots(report), step_plots(report)
    images, tokens = image_views(report, sides), token_views(sides, vocabularies(text_dir))
    rows, more = _rows(report)
    header = (f"impl against {report.reference}, profile {report.profile}, model {report.model}, dtype "
              f"{report.dtype}, {report.threads} thread(s), tolerance max_ulp={report.max_ulp}, mode {report.mode}")
    if report.profile == "dump":
        header = f"dump {report.model} against dump {report.reference}, tolerance max_ulp={report.max_ulp}" + (
            f" or max_abs<={report.max_abs:g}" if report.max_abs is not None else "")
    n_images = sum(len(x) for x in (depth, steps)) + 3 * len(images)
    return template("report.html").render(
        title=report.model, kind=kind, passed=not report.failures, verdict=verdict(report), header=header,
        depth=depth, steps=steps, images=images, tokens=tokens, reference=report.reference, explain=explain,
        tokens_note="" if text_dir else "(token texts: no tokenizer folder)", rows=rows, rows_more=more,
        sources=json.dumps({"versions": report.versions, **report.sources}, indent=1, default=str),
        n_images=n_images)
