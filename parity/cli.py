"""``sd3parity`` command line.

Exit codes of ``check`` (and of every command for the last three): 0 every record within tolerance; 1 a record
exceeds it; 2 bad input or usage; 3 a reference or model the harness cannot run as asked (the message names what
differs); 4 an internal error (a one-line message; ``--debug`` shows the traceback). ``verify`` and ``record``
add their own codes (see ``parity/golden.py`` and the README). ``tokens`` exits 1 where impl differs from a
tokenizer it reproduces.
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_DIVERGENCE, EXIT_USAGE, EXIT_UNSUPPORTED, EXIT_INTERNAL = 0, 1, 2, 3, 4


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise ValueError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 64x64")
    return int(h), int(w)


def spec_from(args):
    """The run the options describe (``run.Spec``), validated before anything heavy is imported."""
    from parity import flags as F
    from parity.run import DEFAULT_PROMPTS, Spec, validate

    height, width = _size(args.size)
    overrides = tuple(F.parse_override(f) for f in args.flag)
    s = Spec(model=args.model, checkpoint=getattr(args, "checkpoint", None), config=getattr(args, "config", None),
             prompts=_prompts(args, DEFAULT_PROMPTS), profile=args.profile, overrides=overrides,
             dtype=args.dtype, threads=args.threads, text_only=args.text_only, families=tuple(args.family or ()),
             steps=args.steps, guidance=args.guidance, seed=args.seed, shift=args.shift, height=height, width=width,
             image=getattr(args, "image", None), strength=getattr(args, "strength", 0.6), slg=tuple(args.slg),
             negative_zero=args.negative_zero, empty_padding=args.empty_padding,
             comfyui_attention=args.comfyui_attention,
             sai_code=args.sai_code, comfyui=getattr(args, "comfyui", None), max_ulp=getattr(args, "max_ulp", 0),
             noise_floor=getattr(args, "noise_floor", False) or getattr(args, "tolerance", "ulp") == "noise",
             tolerance=getattr(args, "tolerance", "ulp"), mode=getattr(args, "mode", "propagated"),
             reference_dump=getattr(args, "reference_dump", None), stream=getattr(args, "stream", False),
             max_memory=getattr(args, "max_memory", None))
    if getattr(args, "workflow", None):
        s = from_workflow(s, args.workflow)
    validate(s)
    return s


def _prompts(args, default: tuple) -> tuple:
    """The prompts; with ``--prompt-clip-g`` / ``--prompt-t5``, the one ``--prompt`` as CLIP-L's text and theirs
    (each the prompt unless given)."""
    g, t5 = getattr(args, "prompt_clip_g", None), getattr(args, "prompt_t5", None)
    if g is None and t5 is None:
        return tuple(args.prompt or default)
    if len(args.prompt or ()) != 1:
        raise ValueError("--prompt-clip-g / --prompt-t5 give one prompt's other texts: give exactly one --prompt "
                         "(CLIP-L's text)")
    p = args.prompt[0]
    return ((p, p if g is None else g, p if t5 is None else t5),)


def from_workflow(s, path: str):
    """``s`` with the settings the ComfyUI workflow at ``path`` names (they replace the options': parity.workflow)."""
    from dataclasses import replace

    from parity.workflow import settings

    w = settings(path)
    fields = {"prompts": (w.prompt,), "seed": w.seed, "steps": w.steps, "guidance": w.guidance, "workflow": path,
              "overrides": tuple(sorted({**dict(s.overrides), **w.flags}.items()))}
    fields.update({k: v for k, v in (("height", w.height), ("width", w.width), ("shift", w.shift)) if v is not None})
    if w.strength is not None:
        if s.image is None:
            raise ValueError(f"--workflow {path}: it encodes a picture (img2img): give it as --image PNG")
        fields["strength"] = w.strength
    if w.slg:
        fields["slg"] = w.slg
    if w.negative_zero is not None:
        fields["negative_zero"] = w.negative_zero
    fields["empty_padding"] = w.empty_padding
    return replace(s, **fields)


def _check(args) -> int:
    from parity.run import Progress, check

    s = spec_from(args)
    if args.html:
        _html_available()
    report = check(s, progress=Progress(not (args.quiet or args.json)))
    return _emit(args, report, list(s.prompts), text_dir=report.text_dir)


def _emit(args, report, prompts: list[str], kind: str = "check", **render) -> int:
    """The report of check or compare-dumps: the HTML and Markdown files asked for, then JSON or the text table."""
    from parity.report import format_table, markdown

    if args.html:
        from parity.html import render as html

        _write_text(args.html, html(report, report.sides, kind=kind, **render))
    if args.markdown:
        _write_text(args.markdown, markdown(report))
    if args.json:
        print(json.dumps({**report.to_json(), **({"prompts": prompts} if prompts else {})}, indent=1))
    else:
        print(format_table(report, prompts, quiet=args.quiet))
    return EXIT_DIVERGENCE if report.failures else EXIT_OK


def _dump(args) -> int:
    """One side's records of the run as a dump (``parity.dump``): impl under the profile's flags, or a reference
    side running its own procedure (the profile is the side's)."""
    from dataclasses import replace
    from pathlib import Path

    from parity import dump as D
    from parity import records as R
    from parity.golden import versions
    from parity.run import execute, plan_memory, resolve, spec_json

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out}: exists; a dump is written to a new directory")
    s = spec_from(args)
    if args.side != "impl":
        s = replace(s, profile=args.side)
    run = plan_memory(resolve(s))
    side, sources = execute(run, args.side)
    if not args.weights:
        side = {k: v for k, v in side.items() if not R.is_weight(v[0])}
    producer = {"name": "sd3-parity", "side": args.side, "versions": versions(), "sources": sources}
    n = D.write(out, side, spec_json(s), producer, args.scheme)
    print(f"wrote {out}: {n} records of {args.side} ({args.scheme} scheme)")
    return EXIT_OK


def _compare_dumps(args) -> int:
    from pathlib import Path

    from parity.dump import compare

    if args.max_ulp < 0 or (args.max_abs is not None and not args.max_abs >= 0):
        raise ValueError("--max-ulp and --max-abs: at least 0")
    if args.html:
        _html_available()
    return _emit(args, compare(Path(args.a), Path(args.b), args.max_ulp, args.max_abs, args.strict), [],
                 kind="compare-dumps")


def _html_available() -> None:
    """--html needs the report extra: say so before any work."""
    import importlib.util

    missing = [m for m in ("matplotlib", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--html needs {' and '.join(missing)}: pip install -e '.[report]'")


def _fixture(args) -> int:
    from pathlib import Path

    from parity.fixture import plan_size, write

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out}: exists; a fixture is written to a new directory")
    size = plan_size(args.preset, args.layout, args.dtype)
    print(f"writing {args.preset} ({args.layout} layout, {args.dtype}, seed {args.seed}): {size / 2 ** 30:.1f} GiB",
          file=sys.stderr)
    m = write(args.preset, out, args.layout, args.dtype, args.seed,
              progress=lambda rel: print(f"  {rel}", file=sys.stderr, flush=True))
    print(f"wrote {out}: " + ", ".join(f"{rel} {digest[:12]}" for rel, digest in m["files"].items()))
    return EXIT_OK


def _write_text(path: str, text: str) -> None:
    """Write a report file atomically (a reader never sees half of it)."""
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _explain(args) -> int:
    from parity.explain import explain, format_explain

    between = tuple(args.between) if args.between else None
    from parity.flags import PROFILES

    if between and any(p not in PROFILES for p in between):
        raise ValueError(f"--between {' '.join(between)}: two profiles of {', '.join(PROFILES)}")
    s = spec_from(args)

    shown = not args.json and sys.stderr.isatty()  # a line redrawn in place: on a terminal only

    def progress(n, values):
        if shown:
            print(f"\r  run {n}: {', '.join(f'{k}={v}' for k, v in values) or 'as given'}"[:100].ljust(100), end="",
                  file=sys.stderr, flush=True)
    if args.html:
        _html_available()
    result = explain(s, between, progress)
    start = result.pop("report")
    if shown:
        print(file=sys.stderr)
    if args.html:
        from parity.html import render

        _write_text(args.html, render(start, start.sides, start.text_dir, format_explain(result), kind="explain"))
    print(json.dumps(result, indent=1, default=str) if args.json else format_explain(result))
    return EXIT_OK if result["found"] is not None else EXIT_DIVERGENCE


def _tokens(args) -> int:
    from pathlib import Path

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("tokens: give a PROMPT or --prompt-file FILE (one of them)")
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: not a directory")
    prompts = None
    if args.prompt_file is not None:
        from parity.tokens import read_prompts

        prompts = read_prompts(Path(args.prompt_file))
    from parity.embedded import model_dir
    from parity.sides import comfyui
    from parity.sides.sai import code_dir
    from parity.tokens import (corpus_report, divergences, format_corpus, format_tokens, load_tokenizer_files,
                               references, tokens_report, vocabulary)

    refs, missing = references(Path(args.model) if args.model else model_dir(), code_dir(args.sai_code),
                               comfyui.code_dir(args.comfyui))
    vocab = vocabulary(args.model, load_tokenizer_files(args.model))
    if prompts is None:
        report = {**tokens_report(args.prompt, args.model, refs), "vocabulary": vocab, "missing": missing}
        print(json.dumps(report, ensure_ascii=True) if args.json else format_tokens(report))
        return EXIT_DIVERGENCE if divergences(report) else EXIT_OK
    report = {**corpus_report(prompts, args.model, refs), "vocabulary": vocab, "missing": missing}
    print(json.dumps(report, ensure_ascii=True) if args.json else format_corpus(report, prompts))
    return EXIT_DIVERGENCE if any(s["differ"] for s in report["rows"].values()) else EXIT_OK


def _flags(args) -> int:
    from parity import flags as F

    if args.markdown:
        print(F.catalogue(), end="")
    else:
        for f in F.FLAGS:
            print(f"{f.name:<24} {f.side:<5} {f.quirk:<10} diffusers={f.diffusers!s:<16} sai={f.sai!s:<16} {f.changes}")
    return EXIT_OK


def _convert(args) -> int:
    from pathlib import Path

    from parity.convert import diffusers_to_sai_file, sai_file_to_diffusers, scaled_fp8_file

    src, dst = Path(args.src), Path(args.dst)
    if args.fp8_scaled and not src.is_file():
        raise FileNotFoundError(f"{src}: --fp8-scaled converts an SAI single file; no such file")
    if args.fp8_scaled:
        lines = scaled_fp8_file(src, dst)
    elif src.is_file():
        lines = sai_file_to_diffusers(src, dst, Path(args.config) if args.config else None)
    elif src.is_dir():
        lines = diffusers_to_sai_file(src, dst)
    else:
        raise FileNotFoundError(f"{src}: no such file or directory")
    print("\n".join(lines + [f"wrote {dst}"]))
    return EXIT_OK


def _record(args) -> int:
    from pathlib import Path

    from parity.golden import GoldenError, check_name, record

    if args.name is not None:
        check_name(args.name)
    s = spec_from(args)
    default = f"{Path(args.model).name if args.model else 'embedded'}-{args.profile}-{args.dtype}"
    target = Path(args.golden_dir) / (args.name or default)
    try:
        m, removed = record(target, s, force=args.force)
    except GoldenError as e:
        print(f"sd3parity record: {e.kind}: {e}", file=sys.stderr)
        return e.code
    if removed:
        print(f"removed what a killed record left: {', '.join(removed)}")
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"wrote {target}: {len(m['records'])} records, {size / 1e6:.2f} MB")
    return EXIT_OK


def _verify(args) -> int:
    from pathlib import Path

    from parity.golden import GoldenError, golden_sets, verify

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: at least 1")
    if args.html:
        _html_available()
    worst = 0
    try:
        sets = golden_sets(Path(args.golden_dir))
    except GoldenError as e:
        print(f"sd3parity verify: {e.kind}: {e}", file=sys.stderr)
        return e.code
    rows = []
    for d in sets:
        try:
            v = verify(d, args.threads, False if args.impl_only else None, args.sai_code)
            kind, code, lines = v.kind, v.code, v.lines
        except GoldenError as e:
            kind, code, lines = e.kind, e.code, [str(e)]
        print(f"{d}: {kind} (exit {code})")
        print("\n".join("  " + line for line in lines))
        rows.append((d, kind, code, lines))
        worst = worst or code
    if args.markdown:
        _write_text(args.markdown, _verify_markdown(rows, worst))
    if args.html:
        from parity.html import template

        sets = [{"name": d.name, "kind": kind, "code": code, "text": "\n".join(lines)} for d, kind, code, lines in rows]
        _write_text(args.html, template("verify.html").render(sets=sets, worst=worst))
    return worst


def _verify_markdown(rows, worst: int) -> str:
    """A job summary: one row per golden set (its verdict and exit code), then what each one printed."""
    out = [f"## sd3-parity verify: {'PASS' if worst == 0 else f'exit {worst}'}", "",
           "| golden set | verdict | exit |", "|---|---|---:|"]
    out += [f"| `{d.name}` | {kind} | {code} |" for d, kind, code, _ in rows]
    for d, kind, _, lines in rows:
        out += ["", f"<details><summary>{d.name}: {kind}</summary>", ""] + [f"- {line}" for line in lines]
        out += ["", "</details>"]
    return "\n".join(out) + "\n"


def _stream_options(p) -> None:
    p.add_argument("--stream", action="store_true", help="page each side's text layers and MMDiT blocks in from the "
                   "weight files one at a time instead of loading the models whole (diffusers profile); a run of "
                   "--model / --checkpoint streams by itself when it would not fit in memory")
    p.add_argument("--max-memory", type=float, metavar="GB", help="the memory the run may take (default: what is "
                   "available): a larger need in memory streams, or is refused when the run cannot stream")


def _run_options(p, check: bool = True) -> None:
    p.add_argument("--model", help="diffusers-layout SD3/SD3.5 directory (default: the embedded tiny model)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable; default: a built-in set)")
    p.add_argument("--prompt-clip-g", metavar="TEXT", help="CLIP-G's own text (diffusers' prompt_2, "
                   "CLIPTextEncodeSD3's clip_g); --prompt is then CLIP-L's (default: the prompt)")
    p.add_argument("--prompt-t5", metavar="TEXT", help="T5's own text (diffusers' prompt_3, CLIPTextEncodeSD3's "
                   "t5xxl; default: the prompt)")
    p.add_argument("--profile", choices=("diffusers", "sai", "comfyui"), default="diffusers",
                   help="impl's flag values and the reference they are checked against (default diffusers)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--flag", action="append", default=[], metavar="NAME=VALUE", help="override one flag of the profile")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every side (default 1)")
    p.add_argument("--text-only", action="store_true", help="compare the text stack only")
    p.add_argument("--family", action="append", choices=("sd3-medium", "sd3.5-large", "sd3.5-medium"),
                   help="embedded transformer family for the image side (repeatable; default: all three)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the image run (default 2)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5.0; <= 1 runs no CFG batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, help="sigma shift on every side (default: the shift flag's rule for impl, "
                   "each reference its own: diffusers the scheduler config, the SD3.5 code 1.0 for SD3-Medium)")
    p.add_argument("--size", default="64x64", help="HEIGHTxWIDTH in pixels (default 64x64)")
    p.add_argument("--slg", type=int, action="append", default=[], metavar="LAYER",
                   help="skip-layer guidance layer (repeatable; window 0.01-0.2, scale by the slg flag)")
    p.add_argument("--negative-zero", type=float, metavar="FRACTION",
                   help="comfyui: the negative as ComfyUI's older SD3 workflows build it: the empty prompt until "
                   "FRACTION of the schedule (ConditioningSetTimestepRange), then ConditioningZeroOut's zeros; 0: "
                   "zeros throughout (default: the empty prompt throughout)")
    p.add_argument("--empty-padding", choices=("empty_prompt", "none"), default="empty_prompt",
                   help="comfyui: CLIPTextEncodeSD3's empty_padding, for the empty negative and per-encoder texts; "
                   "none: an empty text has no tokens (both CLIP texts empty: no CLIP rows and a zero pooled "
                   "vector; T5's: its end token alone) (default empty_prompt: encoded as the empty prompt, as "
                   "CLIPTextEncode)")
    p.add_argument("--comfyui-attention", choices=("sdpa", "sub_quad"), default="sdpa",
                   help="comfyui: import ComfyUI with --use-pytorch-cross-attention (sdpa, its choice on NVIDIA GPUs) "
                   "or without it (sub_quad: its CPU default kernels), and set the attention_kernel flag to match "
                   "unless --flag names it (default sdpa)")
    p.add_argument("--sai-code", metavar="DIR", help="a local checkout of Stability-AI/sd3.5: the reference of the sai "
                   "profile (default: $SD3PARITY_SAI_CODE)")
    p.add_argument("--comfyui", metavar="DIR", help="a local ComfyUI checkout: the reference of the comfyui profile "
                   "(default: $SD3PARITY_COMFYUI)")
    if check:
        p.add_argument("--checkpoint", help="SAI single-file .safetensors (MMDiT + VAE, optionally the text encoders)")
        p.add_argument("--config", metavar="DIR", help="a diffusers directory with the configs a single file lacks "
                       "(default: the file's own folder when it holds model_index.json, else --model)")
        p.add_argument("--image", help="img2img from this image (its size must equal --size)")
        p.add_argument("--strength", type=float, default=0.6, help="img2img strength (default 0.6)")
        p.add_argument("--workflow", metavar="FILE", help="a ComfyUI workflow (API or UI JSON): its prompt, seed, "
                       "steps, cfg, sampler, scheduler, size, denoise, shift and skip layers replace those options")
    if check is True:
        p.add_argument("--reference-dump", metavar="DIR", help="the reference is this activation dump (sd3parity "
                       "dump, or another implementation's): impl is compared on the records it holds")


def _report_options(p) -> None:
    """The outputs of a report (check, compare-dumps)."""
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="print the verdict and warnings only")
    p.add_argument("--markdown", metavar="PATH", help="also write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report with plots")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sd3parity", description="SD3/SD3.5 reference-parity harness")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="impl vs the references, layer by layer: text stack, then txt2img per model")
    _run_options(c)
    c.add_argument("--max-ulp", type=int, default=0, help="tolerance in ULPs per element (default 0: bitwise)")
    c.add_argument("--noise-floor", action="store_true", help="also run the reference with one more thread: its own "
                   "jitter per record, shown with each divergence, and the cause classes precision / op semantics")
    c.add_argument("--tolerance", choices=("ulp", "noise"), default="ulp", help="ulp: --max-ulp per element "
                   "(default); noise: a record's max abs error within the reference's own jitter there")
    c.add_argument("--mode", choices=("propagated", "teacher-forced", "both"), default="propagated",
                   help="propagated: impl's own run (default); teacher-forced: every impl unit (text layer, MMDiT "
                   "block, final layer, VAE module, sampler step) on the reference's input there, its local error; "
                   "both: each record's propagated and local error, and where error is introduced")
    _stream_options(c)
    _report_options(c)
    c.set_defaults(fn=_check)
    e = sub.add_parser("explain", help="the smallest set of flag values (known quirks) that removes a divergence, and "
                       "what each moves; exit 1 when none does")
    _run_options(e)
    e.add_argument("--between", nargs=2, metavar=("A", "B"), help="explain profile A against profile B's reference: "
                   "the flags on which they differ")
    e.add_argument("--json", action="store_true")
    e.add_argument("--html", metavar="PATH", help="also write the HTML report of the run as given, with the result")
    e.set_defaults(fn=_explain, max_ulp=0)
    d = sub.add_parser("dump", help="write one side's records of the run as an activation dump (the format of "
                       "parity/dump.py), to compare with another implementation's through compare-dumps")
    _run_options(d, check="dump")
    d.add_argument("--side", choices=("impl", "diffusers", "sai"), default="impl",
                   help="impl (under --profile's flags) or a reference running its own procedure (default impl)")
    d.add_argument("--out", required=True, metavar="DIR", help="the dump directory to create (must not exist)")
    d.add_argument("--scheme", choices=("impl", "diffusers"), default="impl",
                   help="record names: the harness's (default) or diffusers / transformers module names")
    d.add_argument("--weights", action="store_true", help="also the loaded parameters (large for real models; "
                   "streamed, those of over 2**20 elements as digests)")
    _stream_options(d)
    d.set_defaults(fn=_dump)
    cd = sub.add_parser("compare-dumps", help="dump A against dump B (the reference), record by record; exit 1 "
                        "where a record exceeds the tolerance")
    cd.add_argument("a")
    cd.add_argument("b")
    cd.add_argument("--max-ulp", type=int, default=0, help="tolerance in ULPs per element (default 0: bitwise)")
    cd.add_argument("--max-abs", type=float, help="also within tolerance: a max abs error at most this (for "
                    "another runtime's kernels, which round differently)")
    cd.add_argument("--strict", action="store_true", help="a record only one dump holds is a failure (default: "
                    "compare the records both hold and count the others)")
    _report_options(cd)
    cd.set_defaults(fn=_compare_dumps)
    fx = sub.add_parser("fixture", help="write a synthetic full-size model (the released shapes, deterministic "
                        "values; nothing downloaded)")
    fx.add_argument("preset", choices=("sd3-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"))
    fx.add_argument("out", help="the directory to create (must not exist)")
    fx.add_argument("--layout", choices=("diffusers", "sai"), default="diffusers",
                    help="diffusers folders (default) or an SAI single file with its text encoders")
    fx.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    fx.add_argument("--seed", type=int, default=0, help="the values' seed (default 0)")
    fx.set_defaults(fn=_fixture)
    t = sub.add_parser("tokens", help="token ids of a prompt (or a corpus) under impl's tokenizer modes and profiles "
                       "and the real tokenizers; exit 1 where impl differs from a tokenizer it reproduces")
    t.add_argument("prompt", nargs="?")
    t.add_argument("--prompt-file", metavar="FILE", help="prompts, one per line, or JSON Lines with a 'prompt' key: "
                   "a summary of which prompts differ in which mode, and the likely class")
    t.add_argument("--model", help="directory with tokenizer/, tokenizer_2/, tokenizer_3/ (default: the embedded "
                   "default, whose T5 vocabulary is a tiny one)")
    t.add_argument("--sai-code", metavar="DIR", help="also the SD3.5 code's SD3Tokenizer (default: $SD3PARITY_SAI_CODE)")
    t.add_argument("--comfyui", metavar="DIR", help="also ComfyUI's SD3Tokenizer (default: $SD3PARITY_COMFYUI)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=_tokens)
    f = sub.add_parser("flags", help="the compatibility flags (--markdown: the quirk catalogue, QUIRKS.md)")
    f.add_argument("--markdown", action="store_true")
    f.set_defaults(fn=_flags)
    v = sub.add_parser("convert", help="SAI single file <-> diffusers layout, or to ComfyUI's scaled fp8")
    v.add_argument("src", help="an SAI .safetensors file (-> diffusers directory) or a diffusers directory (-> file)")
    v.add_argument("dst", help="the directory or file to create (must not exist)")
    v.add_argument("--config", metavar="DIR", help="file -> directory: a diffusers directory whose configs give the "
                   "values no tensor shape carries (heads, norm settings); without it they are inferred and printed")
    v.add_argument("--fp8-scaled", action="store_true", help="file -> file: the MMDiT's linear weights in ComfyUI's "
                   "scaled-fp8 layout (float8_e4m3fn, a float32 scale per tensor), as ComfyUI's *_fp8_scaled files")
    v.set_defaults(fn=_convert)
    r = sub.add_parser("record", help="write a golden set (impl and reference records)")
    _run_options(r, check=False)
    r.add_argument("--golden-dir", default="golden")
    r.add_argument("--name", help="set name (default embedded-PROFILE-DTYPE, or MODELDIR-PROFILE-DTYPE)")
    r.add_argument("--force", action="store_true", help="replace an existing set of that name")
    r.add_argument("--noise-floor", action="store_true", help="also store the reference's own jitter per record "
                   "(its run on one more thread)")
    r.set_defaults(fn=_record)
    v2 = sub.add_parser("verify", help="compare impl (and the installed reference) with golden sets; exit codes "
                        "classify what changed (see parity/golden.py)")
    v2.add_argument("--golden-dir", default="golden", help="a set, or a folder of sets (default golden/)")
    v2.add_argument("--threads", type=int, help="run with this many threads instead of the recorded count")
    v2.add_argument("--impl-only", action="store_true", help="do not run the reference even if it is installed")
    v2.add_argument("--markdown", metavar="PATH", help="also write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")
    v2.add_argument("--html", metavar="PATH", help="also write an HTML page: one row per set, then what each printed")
    v2.add_argument("--sai-code", metavar="DIR", help="the SD3.5 code for sets of the sai profile "
                    "(default: $SD3PARITY_SAI_CODE; without it their reference is not run)")
    v2.set_defaults(fn=_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    import os

    # Before torch loads (it reads this once): its CPU allocator backs each allocation of 2 MB or more with
    # transparent huge pages where the system allows them (THP "madvise" or "always"), 512 times fewer page faults.
    # Measured reading 5.3 GB of SD3.5-Large block weights the way a streamed run does: 4.2 s, 1.6 s with it.
    # Where torch is already imported (a library user's process) it has no effect; results are the same either way.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = parser().parse_args(argv)
    from parity.run import Unsupported

    try:
        return args.fn(args)
    except Unsupported as e:
        print(f"sd3parity {args.cmd}: unsupported: {e}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    except (ValueError, OSError) as e:  # bad input: options, files, configs, weights (their errors name them)
        print(f"sd3parity {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - an internal error: one line, the traceback on request
        if args.debug:
            raise
        print(f"sd3parity {args.cmd}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
