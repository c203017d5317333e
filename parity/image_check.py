"""The image side of ``sd3parity check``: one txt2img (or img2img) run through impl and through a reference,
compared at every transformer call (step x branch x block x stream x sub-op), at the sampler (timestep, guided
velocity or x0, latent after each step) and through the VAE to the uint8 image. The reference is diffusers' real
``StableDiffusion3(Img2Img)Pipeline.__call__`` (diffusers profile) or the SD3.5 reference code from a local
checkout (sai profile; ``parity.sai_reference``).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from parity import layermap as LM
from parity import records as R
from parity.determinism import own_storage


@dataclass(frozen=True)
class ImageRun:
    prompt: str
    negative: str = ""
    steps: int = 2
    guidance: float = 5.0
    seed: int = 0
    height: int = 64
    width: int = 64
    slg_layers: tuple[int, ...] = ()
    shift: float | None = None  # sigma shift, both sides; None: the shift flag's value for the model (QUIRKS S2)
    dtype: torch.dtype = torch.float32  # the pipeline dtype (torch_dtype of from_pretrained)
    init_image: np.ndarray | None = None  # (H, W, 3) uint8: img2img from it
    strength: float = 0.6


def vae_map(n_levels: int, blocks_per_level: int) -> list[LM.Point]:
    """impl decoder (SAI names) <-> diffusers ``AutoencoderKL.decoder``, in execution order."""
    pts = [LM.Point("decoder.conv_in", "decoder.conv_in", "decoder.conv_in"),
           LM.Point("decoder.mid.block_1", "decoder.mid.block_1", "decoder.mid_block.resnets.0"),
           LM.Point("decoder.mid.attn_1", "decoder.mid.attn_1", "decoder.mid_block.attentions.0"),
           LM.Point("decoder.mid.block_2", "decoder.mid.block_2", "decoder.mid_block.resnets.1")]
    for i in reversed(range(n_levels)):
        k = n_levels - 1 - i
        for j in range(blocks_per_level):
            pts.append(LM.Point(f"decoder.up.{i}.block.{j}", f"decoder.up.{i}.block.{j}",
                                f"decoder.up_blocks.{k}.resnets.{j}"))
        if i:
            pts.append(LM.Point(f"decoder.up.{i}.upsample", f"decoder.up.{i}.upsample",
                                f"decoder.up_blocks.{k}.upsamplers.0"))
    return pts + [LM.Point("decoder.norm_out", "decoder.norm_out", "decoder.conv_norm_out"),
                  LM.Point("decoder.conv_out", "decoder.conv_out", "decoder.conv_out")]


def vae_encoder_map(n_levels: int, blocks_per_level: int) -> list[LM.Point]:
    """impl encoder (SAI names) <-> diffusers ``AutoencoderKL.encoder``, in execution order."""
    pts = [LM.Point("encoder.conv_in", "encoder.conv_in", "encoder.conv_in")]
    for i in range(n_levels):
        for j in range(blocks_per_level):
            pts.append(LM.Point(f"encoder.down.{i}.block.{j}", f"encoder.down.{i}.block.{j}",
                                f"encoder.down_blocks.{i}.resnets.{j}"))
        if i != n_levels - 1:
            pts.append(LM.Point(f"encoder.down.{i}.downsample", f"encoder.down.{i}.downsample",
                                f"encoder.down_blocks.{i}.downsamplers.0"))
    return pts + [LM.Point("encoder.mid.block_1", "encoder.mid.block_1", "encoder.mid_block.resnets.0"),
                  LM.Point("encoder.mid.attn_1", "encoder.mid.attn_1", "encoder.mid_block.attentions.0"),
                  LM.Point("encoder.mid.block_2", "encoder.mid.block_2", "encoder.mid_block.resnets.1"),
                  LM.Point("encoder.norm_out", "encoder.norm_out", "encoder.conv_norm_out"),
                  LM.Point("encoder.conv_out", "encoder.conv_out", "encoder.conv_out")]


def _calls(model, store: list, captured: dict):
    """Record the inputs of every call of a transformer (impl positional, diffusers keyword) and how many
    tensors each capture point held before it, so records can be attributed to calls (skipped layers leave gaps)."""
    def pre(_m, args, kwargs):
        if kwargs.get("hidden_states") is not None:
            inputs = (kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"],
                      kwargs["pooled_projections"])
        elif "context" in kwargs:  # the SD3.5 reference's MMDiTX: (x, t, context=, y=)
            inputs = (args[0], args[1], kwargs["context"], kwargs["y"])
        else:  # impl: (x, t, y, context)
            inputs = (args[0], args[1], args[3], args[2])
        store.append((inputs, {k: len(v) for k, v in captured.items()}))
    return model.register_forward_pre_hook(pre, with_kwargs=True)


def _capture(es: contextlib.ExitStack, model, vae, maps: tuple, st: dict, side: str) -> None:
    """Hook one side's transformer (records and call inputs) and VAE (decoder and encoder records) into ``st``
    for the life of ``es``. ``side``: "impl" reads each point's impl module, "ref" its reference module."""
    def where(points):
        return {p.layer: ((p.impl, p.impl_reads) if side == "impl" else (p.ref, p.ref_reads)) for p in points}
    pts, vpts, epts = maps
    es.enter_context(LM.capture(model, where(pts), st["mmdit"]))
    es.enter_context(LM.capture(vae, where(vpts), st["vae"]))
    es.enter_context(LM.capture(vae, where(epts), st["enc"]))
    es.callback(_calls(model, st["calls"], st["mmdit"]).remove)


def _of_call(captured: dict, calls: list, n: int, layer: str):
    """The tensor ``layer`` captured during call ``n``, or None if that call skipped it."""
    start = calls[n][1].get(layer, 0)
    end = calls[n + 1][1].get(layer, 0) if n + 1 < len(calls) else len(captured.get(layer, []))
    return captured[layer][start] if end > start else None


def _maps(impl_model, impl_vae, img2img: bool):
    c, vc = impl_model.config, impl_vae.config
    return (LM.mmdit_map(c.depth, c.qk_norm, c.dual_attention_layers),
            vae_map(len(vc.ch_mult), vc.num_res_blocks + 1),
            vae_encoder_map(len(vc.ch_mult), vc.num_res_blocks) if img2img else [])


def sampler_settings(run: ImageRun, form):
    """impl's sampler settings of a run (the shift resolved: ``flags.shift``)."""
    from impl import sampling

    if run.shift is None:
        raise ValueError("ImageRun.shift: resolve it per model first (parity.flags.shift)")
    return sampling.SamplerSettings(steps=run.steps, shift=run.shift, guidance=run.guidance, dtype=run.dtype,
                                    slg_layers=run.slg_layers, form=form)


def image_impl_side(label: str, impl_model, impl_vae, stack, settings, run: ImageRun, opts: dict) -> R.Side:
    """impl's records of one txt2img (or img2img) run: ``impl.pipeline.generate`` with the flags' form."""
    from impl import sampling
    from impl.pipeline import PipelineSettings, generate

    form = opts["form"]
    s = PipelineSettings(sampler=sampler_settings(run, form), seed=run.seed, height=run.height, width=run.width,
                         strength=run.strength, uint8=opts["uint8"], autocast=opts["autocast"])
    init, start = None, 0
    if run.init_image is not None:  # the layout of each reference's preprocessing (S7)
        to_tensor = sampling.image_to_tensor if form.img2img == "diffusers" else sampling.sai_image_to_tensor
        init, start = to_tensor(run.init_image), sampling.start_index(s.sampler, run.strength)
    pts, vpts, epts = _maps(impl_model, impl_vae, init is not None)
    st = {"mmdit": {}, "vae": {}, "enc": {}, "calls": [], "steps": []}
    with contextlib.ExitStack() as es:
        _capture(es, impl_model, impl_vae, (pts, vpts, epts), st, "impl")
        keep = lambda i, d: st["steps"].append({k: d[k] for k in ("velocity", "x0", "latent") if k in d})  # noqa: E731
        result = generate(stack, impl_model, impl_vae, run.prompt, s, settings, run.negative, init, on_step=keep)
    order = ("uncond", "cond") if form.cfg_batch == "uncond_first" else ("cond", "uncond")
    return _side(label, pts, vpts, epts, st, result.image, order, start, transform=False)


def image_sai_ref_side(label: str, code: Path, checkpoint: Path, text_dir: Path, impl_model, impl_vae,
                       run: ImageRun, sampler: str) -> R.Side:
    """The records of the SD3.5 reference code (a local checkout ``code``) on the SAI single file ``checkpoint``:
    its own ``SD3Inferencer.do_sampling`` / ``vae_encode`` / ``vae_decode`` (see ``parity.sai_reference`` for
    what the harness adapts). The conditioning is the text reference's (``parity.reference.sai_encode`` on
    ``text_dir``), float32 as ``get_cond`` returns it."""
    from types import SimpleNamespace

    from impl import sampling
    from parity import reference
    from parity import sai_reference as S

    img2img = run.init_image is not None
    c, vc = impl_model.config, impl_vae.config
    pts = LM.sai_mmdit_map(c.depth, c.qk_norm, c.dual_attention_layers)
    vpts = [LM.Point(p.layer, p.impl, p.impl) for p in vae_map(len(vc.ch_mult), vc.num_res_blocks + 1)]
    epts = [LM.Point(p.layer, p.impl, p.impl) for p in vae_encoder_map(len(vc.ch_mult), vc.num_res_blocks)] if img2img else []
    text = reference.load(text_dir, torch.float32)
    cond, neg = (reference.sai_encode(text, p, torch.float32) for p in (run.prompt, run.negative))
    denoise = 1.0 if run.init_image is None else run.strength
    slg = {"scale": 2.5, "start": 0.01, "end": 0.20, "layers": list(run.slg_layers)} if run.slg_layers else {}  # G5
    st = {"mmdit": {}, "vae": {}, "enc": {}, "calls": [], "steps": []}
    with S.imported(code) as ref, S.on_this_machine(), torch.random.fork_rng(devices=[]):
        model, vae = S.load(ref, checkpoint, vc, run.dtype, run.shift)
        LM.check_coverage(pts, impl_model, model.diffusion_model, LM.MMDIT_SKIP_IMPL, LM.SAI_MMDIT_SKIP,
                          f"{label} mmdit (SD3.5 reference)")
        inferencer = ref.infer.SD3Inferencer()
        inferencer.verbose = False
        inferencer.sd3, inferencer.vae = SimpleNamespace(model=model), SimpleNamespace(model=vae)
        hooks = S.Hooks(ref)
        with contextlib.ExitStack() as es:
            es.enter_context(S.cuda_autocast(ref))
            es.enter_context(hooks.active())
            _capture(es, model.diffusion_model, vae, (pts, vpts, epts), st, "ref")
            latent, start = inferencer.get_empty_latent(run.width, run.height), 0
            if img2img:
                from PIL import Image

                torch.manual_seed(run.seed + 1)  # the posterior's randn_like (unseeded in the reference)
                latent = ref.impls.SD3LatentFormat().process_in(inferencer.vae_encode(Image.fromarray(run.init_image)))
                start = sampling.sai_start_index(run.steps, denoise)  # records numbered by schedule index
            with contextlib.redirect_stderr(io.StringIO()):  # tqdm progress bars
                sampled = inferencer.do_sampling(latent, run.seed, cond, neg, run.steps, run.guidance, sampler,
                                                 denoise, slg)
            image = inferencer.vae_decode(sampled)
        st["steps"] = hooks.per_step()
    pixels = torch.from_numpy(np.asarray(image).copy())
    return _side(label, pts, vpts, epts, st, pixels, ("cond", "uncond"), start, transform=True)


def image_ref_side(label: str, pipe_dir: Path, impl_model, impl_vae, run: ImageRun) -> R.Side:
    """The records of diffusers' own StableDiffusion3(Img2Img)Pipeline.__call__ on ``pipe_dir``. ``impl_model`` and
    ``impl_vae`` only give the layer maps (and the coverage check of the map against both sides)."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    from diffusers.utils import logging as d_logging

    d_logging.set_verbosity_error()
    d_logging.disable_progress_bar()
    img2img = run.init_image is not None
    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(pipe_dir, dtype=run.dtype)
    # measured: diffusers 0.42.1 without accelerate leaves SD3Transformer2DModel in float32 under dtype=bfloat16
    # (the VAE and text encoders are cast); cast it explicitly, the same rounding a dtype-converting load does.
    # Only it: pipe.to() would also cast the float32 T5 `wo` layers transformers keeps in float16 runs.
    pipe.transformer.to(run.dtype)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if part is not None:
            own_storage(part.eval())
    pipe.set_progress_bar_config(disable=True)
    if pipe.scheduler.config.shift != run.shift:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=run.shift)
    pts, vpts, epts = _maps(impl_model, impl_vae, img2img)
    LM.check_coverage(pts, impl_model, pipe.transformer, LM.MMDIT_SKIP_IMPL, LM.MMDIT_SKIP_REF, f"{label} mmdit")
    st = {"mmdit": {}, "vae": {}, "enc": {}, "calls": [], "steps": []}
    ref_step = pipe.scheduler.step  # wrapped to see the guided velocity and the new latent

    def step(model_output, t, sample, **kw):
        out = ref_step(model_output, t, sample, **kw)
        st["steps"].append({"velocity": model_output.clone(), "latent": out[0].clone()})
        return out
    pipe.scheduler.step = step
    kwargs = {"skip_guidance_layers": list(run.slg_layers)} if run.slg_layers else {}
    if img2img:
        from PIL import Image

        kwargs.update(image=Image.fromarray(run.init_image), strength=run.strength)
    with contextlib.ExitStack() as es:
        _capture(es, pipe.transformer, pipe.vae, (pts, vpts, epts), st, "ref")
        image = pipe(run.prompt, negative_prompt=run.negative, height=run.height, width=run.width,
                     num_inference_steps=run.steps, guidance_scale=run.guidance, output_type="pil",
                     generator=torch.Generator("cpu").manual_seed(run.seed), **kwargs).images[0]
    start = run.steps - len(st["steps"])
    return _side(label, pts, vpts, epts, st, torch.from_numpy(np.asarray(image).copy()), ("uncond", "cond"),
                 start, transform=True)


def _side(label, pts, vpts, epts, st, pixels, cfg_order, step0: int, transform: bool) -> R.Side:
    """Records of one side. Calls are attributed to steps (a batch-1 call inside CFG is the skip-layer call of
    the step before it) and split into named branches, so a sampler batching [cond, uncond] still pairs cond
    with cond. ``transform`` applies the map's transforms (reference side)."""
    side: R.Side = {}
    for p in epts:
        R.put(side, st["enc"][p.layer][0], model=label, component="vae", layer=p.layer)
    step, prev = step0 - 1, 0
    for n, (call, _) in enumerate(st["calls"]):
        batch = call[0].shape[0]
        skip = batch == 1 and prev == 2  # the third forward of a CFG step (skip-layer guidance)
        step, prev = (step if skip else step + 1), batch
        branches = list(cfg_order) if batch == 2 else (["skip"] if skip else ["cond"])
        for b, branch in enumerate(branches):
            at = {"model": label, "step": step, "branch": branch}
            for name, t in zip(("latent_in", "timestep", "context", "pooled"), call):
                R.put(side, t[b: b + 1], component="sampler", layer=f"input.{name}", **at)
            for p in pts:
                t = _of_call(st["mmdit"], st["calls"], n, p.layer)
                if t is None:  # a skipped layer (skip-layer guidance)
                    continue
                t = t[b: b + 1]
                if transform:
                    t = LM.apply_transform(p.transform, t)
                R.put(side, t, component="mmdit", layer=p.layer, **at)
    for i, d in enumerate(st["steps"]):
        for name in [n for n in ("velocity", "x0", "latent") if n in d]:  # by the CFG space
            R.put(side, d[name], model=label, component="sampler", layer=name, step=step0 + i)
    for p in vpts:
        R.put(side, st["vae"][p.layer][0], model=label, component="vae", layer=p.layer)
    R.put(side, pixels, model=label, component="vae", layer="image_uint8")
    return side


def load_impl_image_parts(directory: Path, opts: dict):
    """impl MMDiT and VAE from a diffusers-layout directory, through the declared key maps."""
    from impl.checkpoint import infer_vae_config
    from impl.mmdit import MMDiT
    from impl.vae import VAE
    from impl.weights import load_strict, read_config, read_weights_dir
    from parity.convert import config_from_diffusers, diffusers_to_sai, vae_config_from_diffusers

    cfg_path = directory / "transformer" / "config.json"
    mc = config_from_diffusers(read_config(cfg_path), str(cfg_path))
    model = MMDiT(mc, opts["mmdit"])
    load_strict(model, diffusers_to_sai(read_weights_dir(directory / "transformer"), mc, str(directory / "transformer")),
                str(directory / "transformer"))
    vc = vae_config_from_diffusers(read_config(directory / "vae" / "config.json"), str(directory / "vae" / "config.json"))
    state = diffusers_to_sai(read_weights_dir(directory / "vae"), vc, str(directory / "vae"))
    if infer_vae_config(state, str(directory / "vae")) != vc:
        raise ValueError(f"{directory / 'vae'}: weights do not match its config.json")
    vae = VAE(vc, opts["vae_attention"])
    load_strict(vae, state, str(directory / "vae"))
    return model.eval(), vae.eval()
