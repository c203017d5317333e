"""``sd3parity`` command line. Exit codes: 0 ok, 1 a layer exceeds the tolerance, 2 bad input or usage."""
from __future__ import annotations

import argparse
import json
import sys


def _check(args) -> int:
    from parity import flags as F
    from parity.check import DEFAULT_PROMPTS, format_table, run_check

    from parity.check import run_image
    from parity.image_check import ImageRun

    overrides = dict(F.parse_override(f) for f in args.flag)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    height, width = _size(args.size)
    report = run_check(args.model, prompts, args.profile, args.dtype, overrides, args.threads, args.max_ulp)
    from parity.sai_reference import ENV, code_dir

    sai_code = code_dir(args.sai_code) if args.profile == "sai" else None
    if args.text_only:
        report.notes.append("image side not run (--text-only)")
    elif args.profile == "sai" and sai_code is None:
        report.notes.append(f"image side not run: the sai profile's image reference is the SD3.5 code "
                            f"(Stability-AI/sd3.5); point --sai-code or ${ENV} at a local checkout")
    else:
        from parity.check import DTYPES

        init = _read_image(args.image, height, width) if args.image else None
        run = ImageRun(prompt=prompts[0], steps=args.steps, guidance=args.guidance, seed=args.seed, height=height,
                       width=width, slg_layers=tuple(args.slg), shift=args.shift, dtype=DTYPES[args.dtype], init_image=init,
                       strength=args.strength)
        before = len(report.records)
        run_image(report, args.model, {**F.profile_values(args.profile), **overrides}, run, args.family,
                  args.checkpoint, sai_code)
        if len(report.records) == before:
            report.notes.append("image side not run: the model directory has no transformer/ and vae/")
    if args.json:
        print(json.dumps({**report.to_json(), "prompts": prompts}, indent=1))
    else:
        print(format_table(report, prompts))
    return 1 if report.failures else 0


def _read_image(path: str, height: int, width: int):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"--image {path}: not a readable image ({e})") from None
    if arr.shape[:2] != (height, width):
        raise ValueError(f"--image {path}: {arr.shape[0]}x{arr.shape[1]} pixels; --size is {height}x{width} "
                         "(resize it first: the pipelines' resampling is not compared)")
    return arr


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) <= 0 or int(w) <= 0:
        raise ValueError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 64x64")
    if int(h) % 16 or int(w) % 16:
        raise ValueError(f"--size {text}: height and width must be multiples of 16 (VAE 8 x patch 2)")
    return int(h), int(w)


def _tokens(args) -> int:
    from parity.tokens import format_tokens, tokens_report

    report = tokens_report(args.prompt, args.model)
    print(json.dumps(report, ensure_ascii=True) if args.json else format_tokens(report))
    return 0


def _convert(args) -> int:
    from pathlib import Path

    from parity.convert import diffusers_to_sai_file, sai_file_to_diffusers

    src, dst = Path(args.src), Path(args.dst)
    if src.is_file():
        lines = sai_file_to_diffusers(src, dst)
    elif src.is_dir():
        lines = diffusers_to_sai_file(src, dst)
    else:
        raise FileNotFoundError(f"{src}: no such file or directory")
    print("\n".join(lines + [f"wrote {dst}"]))
    return 0


def _record(args) -> int:
    from pathlib import Path

    from parity.check import DEFAULT_PROMPTS
    from parity.golden import Settings, record

    height, width = _size(args.size)
    families = [] if args.text_only else (args.family or (["model"] if args.model else
                                                          ["sd3-medium", "sd3.5-large", "sd3.5-medium"]))
    s = Settings(model_dir=args.model, prompts=args.prompt or list(DEFAULT_PROMPTS), profile=args.profile, dtype=args.dtype,
                 threads=args.threads, families=families, steps=args.steps, guidance=args.guidance, seed=args.seed,
                 height=height, width=width)
    default = f"{Path(args.model).name if args.model else 'embedded'}-{args.profile}-{args.dtype}"
    target = Path(args.golden_dir) / (args.name or default)
    m = record(target, s)
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"wrote {target}: {len(m['records'])} records, {size / 1e6:.2f} MB")
    return 0


def _verify(args) -> int:
    from pathlib import Path

    from parity.golden import GoldenError, golden_sets, verify

    worst = 0
    try:
        sets = golden_sets(Path(args.golden_dir))
    except GoldenError as e:
        print(f"sd3parity verify: {e.kind}: {e}", file=sys.stderr)
        return e.code
    for d in sets:
        try:
            v = verify(d, args.threads, False if args.impl_only else None)
            print(f"{d}: {v.kind} (exit {v.code})")
            print("\n".join("  " + line for line in v.lines))
            code = v.code
        except GoldenError as e:
            print(f"{d}: {e.kind} (exit {e.code})\n  {e}")
            code = e.code
        worst = worst or code
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sd3parity", description="SD3/SD3.5 reference-parity harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="impl vs the references, layer by layer: text stack, then txt2img per family")
    c.add_argument("--model", help="diffusers-layout SD3/SD3.5 directory (default: the embedded tiny model)")
    c.add_argument("--checkpoint", help="SAI single-file .safetensors (MMDiT + VAE) for the image side; text parts "
                   "come from --model or the embedded default")
    c.add_argument("--prompt", action="append", help="prompt (repeatable; default: a built-in set)")
    c.add_argument("--profile", choices=("diffusers", "sai"), default="diffusers")
    c.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    c.add_argument("--flag", action="append", default=[], metavar="NAME=VALUE", help="override one flag of the profile")
    c.add_argument("--threads", type=int, default=1, help="intra-op threads for both sides (default 1)")
    c.add_argument("--max-ulp", type=int, default=0, help="tolerance in ULPs per element (default 0: bitwise)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--text-only", action="store_true", help="compare the text stack only")
    c.add_argument("--family", action="append", choices=("sd3-medium", "sd3.5-large", "sd3.5-medium"),
                   help="embedded transformer family for the image side (repeatable; default: all three)")
    c.add_argument("--steps", type=int, default=2, help="denoising steps of the image run (default 2)")
    c.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5.0; <= 1 runs no CFG batch)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--shift", type=float, help="sigma shift on both sides (default: the shift flag's rule, the "
                   "pipeline's scheduler config or the SD3.5 reference's 1.0 for SD3-Medium, 3.0 otherwise)")
    c.add_argument("--size", default="64x64", help="HEIGHTxWIDTH in pixels (default 64x64)")
    c.add_argument("--image", help="img2img from this image (its size must equal --size)")
    c.add_argument("--strength", type=float, default=0.6, help="img2img strength (default 0.6)")
    c.add_argument("--slg", type=int, action="append", default=[], metavar="LAYER",
                   help="skip-layer guidance layer (repeatable; window 0.01-0.2, scale by the slg flag)")
    c.add_argument("--sai-code", metavar="DIR", help="a local checkout of Stability-AI/sd3.5: the image reference "
                   "of the sai profile (default: $SD3PARITY_SAI_CODE)")
    c.set_defaults(fn=_check)
    t = sub.add_parser("tokens", help="token ids of a prompt under every tokenizer mode and profile")
    t.add_argument("prompt")
    t.add_argument("--model", help="directory with tokenizer/, tokenizer_2/, tokenizer_3/")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=_tokens)
    v = sub.add_parser("convert", help="SAI single file <-> diffusers layout (transformer, VAE)")
    v.add_argument("src", help="an SAI .safetensors file (-> diffusers directory) or a diffusers directory (-> file)")
    v.add_argument("dst", help="the directory or file to create (must not exist)")
    v.set_defaults(fn=_convert)
    r = sub.add_parser("record", help="write a golden set of the embedded default (impl and reference records)")
    r.add_argument("--golden-dir", default="golden")
    r.add_argument("--name", help="set name (default embedded-PROFILE-DTYPE, or MODELDIR-PROFILE-DTYPE)")
    r.add_argument("--model", help="a diffusers-layout model directory (default: the embedded default)")
    r.add_argument("--prompt", action="append")
    r.add_argument("--profile", choices=("diffusers", "sai"), default="diffusers")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--family", action="append", choices=("sd3-medium", "sd3.5-large", "sd3.5-medium"))
    r.add_argument("--text-only", action="store_true")
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--guidance", type=float, default=5.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--size", default="64x64")
    r.set_defaults(fn=_record)
    v2 = sub.add_parser("verify", help="compare impl (and the installed reference) with golden sets; exit codes "
                        "classify what changed (see parity/golden.py)")
    v2.add_argument("--golden-dir", default="golden", help="a set, or a folder of sets (default golden/)")
    v2.add_argument("--threads", type=int, help="run with this many threads instead of the recorded count")
    v2.add_argument("--impl-only", action="store_true", help="do not run the reference even if it is installed")
    v2.set_defaults(fn=_verify)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"sd3parity {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
