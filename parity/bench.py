"""Side-by-side benchmarks: impl against the references, measured in one run on the same thread count.

    python -m parity.bench text|image|check|memory|overhead|comfyui|stream [--threads N] [--repeats N] [--device D]

Prints ratios (impl time / reference time; below 1.0 means impl is faster). Each pair is timed interleaved
(impl, reference, impl, ...) after a warm-up, and the median of the repeats is reported, so drift of the
machine affects both sides alike. Outputs are compared as well, so a fast but wrong impl cannot pass unnoticed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import time
from typing import Callable

import torch

from parity.determinism import pinned


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, calls interleaved, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def prompt_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Prompt-like texts: words, weights, punctuation, a little non-ASCII; fixed by ``seed``."""
    words = ("a photo of the cat dog astronaut riding horse on mars highly detailed cinematic lighting 8k "
             "masterpiece (red:1.2) ((blue eyes)) trending artstation portrait of woman café naïve 東京 🐱 "
             "wow!! amazing! so cool!!! don't it's 1024x1024 f/1.8 --ar 16:9 &amp; ").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def bench_tokenizers(repeats: int) -> list[str]:
    from impl import embedded
    from impl.clip_tokenizer import BPEVocab, ClipTokenizer
    from transformers import CLIPTokenizer

    from parity.embedded import model_dir
    from parity.tokens import openai_tokenizer

    corpus = prompt_corpus()
    vocab = BPEVocab.from_openai_gz(embedded.BPE_GZ)
    rust = CLIPTokenizer.from_pretrained(model_dir() / "tokenizer")
    lines = [f"CLIP tokenizer, {len(corpus)} prompts, {sum(map(len, corpus))} characters (median of {repeats}):"]
    pairs = [("hf", "transformers CLIPTokenizer (Rust), one call per prompt",
              lambda: [rust(p, add_special_tokens=False).input_ids for p in corpus]),
             ("hf", "tokenizers encode_batch (Rust, batched)",
              lambda: [e.ids[1:-1] for e in rust.backend_tokenizer.encode_batch(corpus)])]
    openai = openai_tokenizer()
    if openai is not None:
        pairs.insert(0, ("openai", "OpenAI SimpleTokenizer", lambda: [openai.encode(p) for p in corpus]))
    for mode, name, ref_fn in pairs:
        tok = ClipTokenizer(vocab, mode)
        impl_fn = lambda: [tok.encode(p) for p in corpus]  # noqa: E731
        same = impl_fn() == ref_fn()
        t = interleaved({"impl": impl_fn, "ref": ref_fn}, repeats)
        lines.append(f"  impl {mode:<7} {len(corpus) / t['impl']:>9.0f} prompts/s   vs {name}: "
                     f"{len(corpus) / t['ref']:>9.0f} prompts/s   impl/ref time {t['impl'] / t['ref']:.2f}x"
                     f"   ids equal: {same}")
    tok = ClipTokenizer(vocab, "hf")
    for n in (10_000, 100_000):  # one unbroken word: the BPE loop must stay near-linear
        word = "".join(random.Random(n).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
        impl_fn, ref_fn = (lambda: tok.encode(word)), (lambda: rust(word, add_special_tokens=False).input_ids)
        same = impl_fn() == ref_fn()
        t = interleaved({"impl": impl_fn, "ref": ref_fn}, max(1, repeats // 3))
        lines.append(f"  one {n}-letter word: impl hf {t['impl']:.3f} s   transformers {t['ref']:.3f} s   "
                     f"impl/ref time {t['impl'] / t['ref']:.2f}x   ids equal: {same}")
    return lines


MEDIUM_CLIP = dict(width=768, heads=12, layers=12, intermediate=3072, activation="quick_gelu", projection_dim=768)
MEDIUM_T5 = dict(vocab_size=32128, d_model=1024, d_kv=64, heads=16, d_ff=2816, layers=8)


def bench_encoders(repeats: int) -> list[str]:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    from transformers import CLIPTextConfig
    from transformers import T5Config as HFT5Config

    from impl.clip import ClipConfig, ClipTextEncoder
    from impl.t5 import T5Config, T5Encoder
    from parity.determinism import own_storage

    c, t = ClipConfig(**MEDIUM_CLIP), T5Config(**MEDIUM_T5)
    cases = [
        ("CLIP 768w/12h/12L, 77 tokens", ClipTextEncoder(c), CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.intermediate, num_attention_heads=c.heads,
            num_hidden_layers=c.layers, hidden_act=c.activation, projection_dim=c.projection_dim,
            max_position_embeddings=77, eos_token_id=2)), torch.randint(0, 49407, (1, 77)),
         lambda out: out.last, lambda out: out.last_hidden_state),
        ("T5 1024d/16h/8L ff2816, 256 tokens", T5Encoder(t), T5EncoderModel(HFT5Config(
            vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, num_heads=t.heads, d_ff=t.d_ff,
            num_layers=t.layers, feed_forward_proj="gated-gelu", dropout_rate=0.0)), torch.randint(0, 32000, (1, 256)),
         lambda out: out, lambda out: out.last_hidden_state),
    ]
    lines = [f"Text encoders, float32, batch 1 (median of {repeats}):"]
    for name, impl_model, ref_model, ids, impl_out, ref_out in cases:
        ref_model = own_storage(ref_model.eval())
        state = {k: v for k, v in ref_model.state_dict().items() if k in impl_model.state_dict()}
        impl_model.load_state_dict(state, strict=True)
        impl_model.eval()
        same = torch.equal(impl_out(impl_model(ids)), ref_out(ref_model(ids)))
        tm = interleaved({"impl": lambda: impl_model(ids), "ref": lambda: ref_model(ids)}, repeats)
        lines.append(f"  {name:<36} impl {tm['impl'] * 1e3:8.1f} ms   transformers {tm['ref'] * 1e3:8.1f} ms   "
                     f"impl/ref {tm['impl'] / tm['ref']:.2f}x   bitwise equal: {same}")
    return lines


MEDIUM_MMDIT = dict(depth=4, hidden=1536, heads=24, pos_embed_max_size=64, context_dim=4096, pooled_dim=2048,
                    qk_norm=True)


def bench_mmdit(repeats: int) -> list[str]:
    """impl MMDiT vs diffusers SD3Transformer2DModel: 4 blocks, head_dim 64, 1024 image tokens, 154 context tokens."""
    from diffusers import SD3Transformer2DModel

    from impl.mmdit import MMDiT, MMDiTConfig
    from parity.convert import diffusers_config, sai_to_diffusers
    from parity.determinism import own_storage

    c = MMDiTConfig(**MEDIUM_MMDIT)
    impl = MMDiT(c).eval()
    with torch.no_grad():
        for p in impl.parameters():
            p.normal_(0, 0.02)
        impl.pos_embed.normal_(0, 0.5)
    ref = SD3Transformer2DModel(**{k: v for k, v in diffusers_config(c).items() if k[0] != "_"}).eval()
    ref.load_state_dict(sai_to_diffusers(impl.state_dict(), c), strict=True)
    own_storage(ref)
    x, t = torch.randn(1, 16, 64, 64), torch.tensor([500.0])
    y, ctx = torch.randn(1, 2048), torch.randn(1, 154, 4096)
    same = torch.equal(impl(x, t, y, ctx), ref(hidden_states=x, timestep=t, pooled_projections=y,
                                                encoder_hidden_states=ctx).sample)
    tm = interleaved({"impl": lambda: impl(x, t, y, ctx),
                      "ref": lambda: ref(hidden_states=x, timestep=t, pooled_projections=y, encoder_hidden_states=ctx)},
                     repeats)
    return [f"MMDiT 4 blocks, 24 heads x 64, qk-norm, 1024 image + 154 context tokens, float32 (median of {repeats}):",
            f"  impl {tm['impl'] * 1e3:8.1f} ms   diffusers {tm['ref'] * 1e3:8.1f} ms   impl/ref {tm['impl'] / tm['ref']:.2f}x"
            f"   bitwise equal: {same}"]


def bench_comfyui(repeats: int, device: str) -> list[str]:
    """impl's MMDiT against ComfyUI's own on ``device`` (ComfyUI imported for it, its model management moving the
    model there): the embedded families (bitwise equality of one call) and a 12-block model (equality and times),
    float32 and bfloat16 as ComfyUI loads them; and the dtypes and attention ComfyUI picks on that device."""
    import os
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from impl import embedded
    from impl.mmdit import MMDiT, MMDiTConfig
    from parity import flags as F
    from parity.embedded import single_file
    from parity.sides import comfyui as C

    code = C.code_dir(None)
    if code is None:
        raise SystemExit(f"no ComfyUI checkout: set ${C.ENV}")
    gpu = device != "cpu"
    c = C.load(code, gpu=gpu)
    mm = __import__("comfy.model_management", fromlist=["x"])
    attention = __import__("comfy.ldm.modules.attention", fromlist=["x"])
    lines = [f"ComfyUI {C.fingerprint(code).get('version')} on {device}: its device {mm.get_torch_device()}, text "
             f"encoders {mm.text_encoder_dtype()}, vae {mm.vae_dtype()}, attention "
             f"{attention.optimized_attention.__name__}, tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
             f"cudnn tf32 {torch.backends.cudnn.allow_tf32}"]
    options = F.image_options(F.profile_values("comfyui"))["mmdit"]
    big = MMDiTConfig(depth=12, hidden=768, heads=12, pos_embed_max_size=96, qk_norm=True, context_dim=4096,
                      pooled_dim=2048)
    tmp = Path(tempfile.mkdtemp(prefix="sd3parity-bench-"))
    model = MMDiT(big).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.pos_embed.normal_(0, 0.5)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              tmp / "big.safetensors")
    cases = [(f, single_file(f), embedded.MMDIT[f], 8) for f in ("sd3-medium", "sd3.5-large", "sd3.5-medium")]
    cases.append(("12 blocks x 768", tmp / "big.safetensors", big, 64))  # latent side 64: 1024 image tokens
    from impl.weights import load_strict, read_safetensors

    for label, path, config, side in cases:
        for dtype in (torch.float32, torch.bfloat16):
            with C.running(c), contextlib.redirect_stdout(io.StringIO()):
                patcher = c.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                            model_options={"dtype": dtype})[0]
                mm.load_models_gpu([patcher])
            theirs = patcher.model.diffusion_model
            dev = next(theirs.parameters()).device
            ours = MMDiT(config, options)
            load_strict(ours, {k.removeprefix("model.diffusion_model."): v for k, v in
                               read_safetensors(path).items() if k.startswith("model.diffusion_model.")}, str(path))
            compute = patcher.model.manual_cast_dtype or dtype
            if compute != dtype:  # stored in dtype, computed in compute (half_compute=float32)
                ours.to(dtype)
            ours = ours.to(device=dev, dtype=compute).eval()
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, config.in_channels, side, side, generator=g).to(dev, compute)
            t = torch.tensor([700.0], device=dev)
            ctx = torch.randn(1, 154, config.context_dim, generator=g).to(dev, compute)
            y = torch.randn(1, config.pooled_dim, generator=g).to(dev, compute)

            def comfy_call():
                with C.running(c):
                    return theirs(x, t, context=ctx, y=y)

            def impl_call():
                return ours(x, t, y, ctx)
            with torch.no_grad():
                a, b = impl_call(), comfy_call()
                same = torch.equal(a, b)
                err = (a.float() - b.float()).abs().max().item()
                tm = interleaved({"impl": lambda: _sync(impl_call, dev), "comfyui": lambda: _sync(comfy_call, dev)},
                                 repeats)
            lines.append(f"  {label:<16} {str(dtype):<15} computes in {str(compute):<15} bitwise equal: {same!s:<5} "
                         f"max abs {err:.3g}  impl {tm['impl'] * 1e3:7.2f} ms  ComfyUI {tm['comfyui'] * 1e3:7.2f} ms  "
                         f"impl/ComfyUI {tm['impl'] / tm['comfyui']:.2f}x")
            mm.unload_all_models()
    for f in tmp.iterdir():
        f.unlink()
    os.rmdir(tmp)
    return lines


def _sync(fn, device):
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


_BARE = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
from diffusers.utils import logging
logging.disable_progress_bar()
torch.set_num_threads(int(sys.argv[1]))
for d in sys.argv[2:]:
    pipe = StableDiffusion3Pipeline.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
         generator=torch.Generator("cpu").manual_seed(0))
"""


def bench_check(repeats: int, threads: int) -> list[str]:
    """Wall time, imports included, of ``sd3parity check`` (text stack + txt2img of the three embedded families,
    both sides, every record compared) vs bare diffusers pipeline runs of the same three models."""
    import subprocess
    import sys

    from impl.embedded import MMDIT
    from parity.embedded import model_dir

    dirs = [str(model_dir(f)) for f in MMDIT]
    runs = {"check": [sys.executable, "-m", "parity.cli", "check", "--threads", str(threads)],
            "bare": [sys.executable, "-c", _BARE, str(threads), *dirs]}

    def timed(cmd):
        def run():
            subprocess.run(cmd, check=False, capture_output=True)
        return run
    tm = interleaved({k: timed(v) for k, v in runs.items()}, repeats)
    return [f"Wall time incl. imports (median of {repeats}), three embedded families, 2 steps, CFG, 64x64:",
            f"  sd3parity check {tm['check']:6.2f} s   bare diffusers pipelines {tm['bare']:6.2f} s   "
            f"ratio {tm['check'] / tm['bare']:.2f}x"]


_PEAK = r"""
import contextlib, io, resource, sys
from parity.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory(threads: int) -> list[str]:
    """Peak RSS of ``check`` runs whose records outgrow memory, with the records' memory budget (default) and
    without one (everything kept in memory), side by side."""
    import os
    import subprocess
    import sys

    prompts = [a for i in range(200) for a in ("--prompt", f"prompt number {i}, a photo of a cat")]
    cases = {"200 prompts --text-only": ["check", "--text-only", *prompts],
             "--steps 50 (three families)": ["check", "--steps", "50"]}
    lines = [f"Peak RSS of one sd3parity check process ({threads} thread(s)):"]
    for name, argv in cases.items():
        peaks = {}
        for budget in ("128", "1000000"):
            env = {**os.environ, "SD3PARITY_RECORD_MEMORY": budget}
            out = subprocess.run([sys.executable, "-c", _PEAK, *argv, "--threads", str(threads)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            assert out[0] == "0", f"{name}: exit {out[0]}"
            peaks[budget] = int(out[1]) / 2 ** 20
        lines.append(f"  {name:<28} budget 128 MB: {peaks['128']:5.2f} GB   all in memory: {peaks['1000000']:5.2f} GB"
                     f"   ratio {peaks['128'] / peaks['1000000']:.2f}x")
    return lines


def bench_overhead(repeats: int, threads: int) -> list[str]:
    """What the divergence reports cost beside a plain propagated ``check`` of the same run, in one process,
    interleaved: teacher forcing (``--mode both``), the weight records (the run without them: ``put_weights`` made
    a no-op), and the HTML report (rendering a finished report). Every run computes both sides afresh."""
    from dataclasses import replace

    import parity.sides as sides
    from parity.html import render
    from parity.run import Spec, check

    spec = Spec(families=("sd3.5-medium",), threads=threads)
    put_weights = sides.put_weights
    reports = {}

    def plain():
        reports["plain"] = check(spec)

    def no_weights():
        sides.put_weights = lambda *a, **k: None
        try:
            check(spec)
        finally:
            sides.put_weights = put_weights
    tm = interleaved({"plain": plain, "both": lambda: check(replace(spec, mode="both")),
                      "no_weights": no_weights}, repeats)
    report = reports["plain"]
    html = interleaved({"html": lambda: render(report, report.sides, report.text_dir)}, repeats)["html"]
    base = tm["plain"]
    return [f"Overhead beside a plain propagated check (embedded sd3.5-medium, 3 prompts, 2 steps; median of "
            f"{repeats}; plain check {base:.2f} s):",
            f"  teacher forcing (--mode both)   {tm['both']:6.2f} s   ratio {tm['both'] / base:.2f}x",
            f"  weight records                  {base - tm['no_weights']:6.2f} s   ratio "
            f"{base / tm['no_weights']:.2f}x (check with them / without)",
            f"  HTML report (render only)       {html:6.2f} s   ratio {(base + html) / base:.2f}x (check + HTML / check)"]


_PEAK_JSON = r"""
import contextlib, io, resource, sys
from parity.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(out.getvalue().strip())
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_BARE_STREAMED = r"""
import json, resource, sys, time
from dataclasses import replace
import torch
from parity.determinism import pinned
from parity.run import Spec, resolve
from parity.sides.diffusers import image_pipeline
from parity.sides.impl import sampler_settings, streamed_image_parts, streamed_text_stack
from parity.stream import return_freed_memory
from impl.pipeline import PipelineSettings, generate
return_freed_memory()
spec = Spec(**json.loads(sys.argv[1]))
run = resolve(spec)
model, out = run.models[0], {}
with pinned(spec.threads), torch.no_grad():
    t = time.perf_counter()
    pipe = image_pipeline(model, run, False, {})
    pipe(spec.prompts[0], negative_prompt="", height=spec.height, width=spec.width, num_inference_steps=spec.steps,
         guidance_scale=spec.guidance, max_sequence_length=run.values["t5_max_length"], output_type="pil",
         generator=torch.Generator("cpu").manual_seed(spec.seed))
    out["diffusers"] = time.perf_counter() - t
    del pipe
    t = time.perf_counter()
    stack, _ = streamed_text_stack(run.text_model, run.dtype)
    mmdit, vae, _ = streamed_image_parts(model, run.opts, run.dtype)
    ps = PipelineSettings(sampler=sampler_settings(run, model), seed=spec.seed, height=spec.height, width=spec.width,
                          uint8=run.opts["uint8"])
    generate(stack, mmdit, vae, spec.prompts[0], ps, run.text, "")
    out["impl"] = time.perf_counter() - t
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
print(json.dumps(out))
"""


def _read_through(d) -> None:
    """Every file under ``d`` read once (the page cache then holds as much of it as fits, the last part read)."""
    buf = bytearray(16 << 20)
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def bench_stream(preset: str, root: str, size: int, threads: int) -> list[str]:
    """A streamed ``check`` of a synthetic full-size model (``sd3parity fixture``, diffusers layout, bfloat16, written
    under ``root`` when absent): one prompt, 2 steps with CFG, ``size`` pixels square, both sides and every record,
    in a process of its own (its peak RSS, wall time, verdict), beside a process running the two sides' bare
    streamed pipelines once each (no records): the ratio of the check's wall time to theirs. Before each process
    the model's files are read through once, untimed, so both start with the page cache in the same state (as much
    of the model as the machine's memory holds: the last part read)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from parity.fixture import write
    from parity.resources import table

    d = Path(root) / preset
    if not (d / "fixture.json").is_file():
        write(preset, d, "diffusers", "bfloat16")
    spec = {"model": str(d), "dtype": "bfloat16", "prompts": ["a photo of a cat"], "height": size, "width": size,
            "threads": threads}
    argv = ["check", "--stream", "--model", str(d), "--dtype", "bfloat16", "--size", f"{size}x{size}", "--prompt",
            spec["prompts"][0], "--threads", str(threads), "--json"]
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}  # as sd3parity sets it
    _read_through(d)
    t = time.perf_counter()
    got = subprocess.run([sys.executable, "-c", _PEAK_JSON, *argv], capture_output=True, text=True, check=False,
                         env=env)
    wall = time.perf_counter() - t
    head = got.stdout.strip().splitlines()
    if not head or head[-1].split()[0] not in ("0", "1"):
        raise RuntimeError(f"check failed: {got.stdout[-2000:]} {got.stderr[-2000:]}")
    report, peak = json.loads("\n".join(head[:-1])), int(head[-1].split()[1])
    _read_through(d)
    t = time.perf_counter()
    bare = subprocess.run([sys.executable, "-c", _BARE_STREAMED, json.dumps(spec)], capture_output=True, text=True,
                          check=True, env=env)
    bare_wall = time.perf_counter() - t
    b = json.loads(bare.stdout.strip().splitlines()[-1])
    first = report["first_divergence"]
    return [f"Streamed check of synthetic {preset} (bfloat16, {size}x{size}, 2 steps, CFG, {threads} thread(s)):",
            f"  check: wall {wall:7.1f} s, peak RSS {peak / 2 ** 20:5.2f} GB, {report['n_records']} records, "
            f"{report['n_failed']} exceed the tolerance, first divergence "
            + ("none" if first is None else f"{first['component']} {first['layer']}"),
            f"  bare streamed forwards: diffusers {b['diffusers']:7.1f} s, impl {b['impl']:7.1f} s (process wall "
            f"{bare_wall:.1f} s, peak RSS {b['peak_rss_gb']:.2f} GB)",
            f"  ratio check / bare {wall / bare_wall:.2f}x",
            "  the check's stages and components (seconds, calls, peak RSS):"] + table(report["resources"]["stages"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parity.bench", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("text", "image", "check", "memory", "overhead", "comfyui", "stream"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="comfyui: the device both sides run on (cpu, cuda)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--preset", default="sd3.5-medium", help="stream: the released configuration (sd3parity fixture)")
    ap.add_argument("--fixtures", default="fixtures", help="stream: where synthetic models are written / found")
    ap.add_argument("--size", type=int, default=128, help="stream: image side in pixels")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with pinned(args.threads):
        print(f"torch {torch.__version__}, {args.threads} thread(s)")
        lines = {"text": lambda: bench_tokenizers(args.repeats) + bench_encoders(args.repeats),
                 "image": lambda: bench_mmdit(args.repeats),
                 "check": lambda: bench_check(args.repeats, args.threads),
                 "memory": lambda: bench_memory(args.threads),
                 "overhead": lambda: bench_overhead(args.repeats, args.threads),
                 "comfyui": lambda: bench_comfyui(args.repeats, args.device),
                 "stream": lambda: bench_stream(args.preset, args.fixtures, args.size, args.threads)}[args.what]()
        for line in lines:
            print(line)


if __name__ == "__main__":
    main()
