"""The image side of ``sd3parity check``: one txt2img run through impl and through diffusers' real
``StableDiffusion3Pipeline.__call__``, compared at every transformer call (step x branch x block x stream x
sub-op), at the sampler (timestep, guided velocity, latent after each step) and through the VAE decoder to the
uint8 image. The diffusers profile only (the SAI sampler forms are not implemented yet).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from parity import layermap as LM
from parity.determinism import own_storage
from parity.metrics import compare


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
        else:  # impl: (x, t, y, context)
            inputs = (args[0], args[1], args[3], args[2])
        store.append((inputs, {k: len(v) for k, v in captured.items()}))
    return model.register_forward_pre_hook(pre, with_kwargs=True)


def _of_call(captured: dict, calls: list, n: int, layer: str):
    """The tensor ``layer`` captured during call ``n``, or None if that call skipped it."""
    start = calls[n][1].get(layer, 0)
    end = calls[n + 1][1].get(layer, 0) if n + 1 < len(calls) else len(captured.get(layer, []))
    return captured[layer][start] if end > start else None


def _branches(n_batch: int, cfg: bool) -> list[str]:
    return ["uncond", "cond"] if cfg and n_batch == 2 else (["skip"] if cfg else ["cond"])


def _coords(layer: str) -> dict:
    """block and stream of an MMDiT record name (``block.3.x.attn.q`` -> 3, image)."""
    parts = layer.split(".")
    if parts[0] == "block":
        return {"block": int(parts[1]), "stream": "image" if parts[2] == "x" else "context"}
    return {"block": None, "stream": None}


def run_image_check(label: str, pipe_dir: Path, impl_model, impl_vae, stack, settings, run: ImageRun,
                    opts: dict, add) -> None:
    """Run both sides once and pass every record to ``add(record_fields, impl_tensor, ref_tensor)``."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    from diffusers.utils import logging as d_logging

    from impl import sampling
    from impl.text import encode_prompt

    d_logging.set_verbosity_error()
    d_logging.disable_progress_bar()
    img2img = run.init_image is not None
    if img2img and opts["sampler"] != "diffusers_euler":
        raise ValueError("img2img is compared in the diffusers sampler form only")
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
    c = impl_model.config
    pts = LM.mmdit_map(c.depth, c.qk_norm, c.dual_attention_layers)
    LM.check_coverage(pts, impl_model, pipe.transformer, LM.MMDIT_SKIP_IMPL, LM.MMDIT_SKIP_REF, f"{label} mmdit")
    vc = impl_vae.config
    vpts = vae_map(len(vc.ch_mult), vc.num_res_blocks + 1)
    stores = {side: {"mmdit": {}, "vae": {}, "calls": [], "steps": []} for side in ("impl", "ref")}

    # reference: the real pipeline call; scheduler.step wrapped to see the guided velocity and the new latent
    ref_step = pipe.scheduler.step

    def step(model_output, t, sample, **kw):
        out = ref_step(model_output, t, sample, **kw)
        stores["ref"]["steps"].append({"velocity": model_output.clone(), "latent": out[0].clone()})
        return out
    pipe.scheduler.step = step
    kwargs = {"skip_guidance_layers": list(run.slg_layers)} if run.slg_layers else {}
    if img2img:
        from PIL import Image

        kwargs.update(image=Image.fromarray(run.init_image), strength=run.strength)
        epts = vae_encoder_map(len(vc.ch_mult), vc.num_res_blocks)
        es_vae = {"impl": {}, "ref": {}}
    with contextlib.ExitStack() as es:
        es.enter_context(LM.capture(pipe.transformer, {p.layer: (p.ref, p.ref_reads) for p in pts},
                                    stores["ref"]["mmdit"]))
        es.enter_context(LM.capture(pipe.vae, {p.layer: (p.ref, p.ref_reads) for p in vpts}, stores["ref"]["vae"]))
        if img2img:
            es.enter_context(LM.capture(pipe.vae, {p.layer: (p.ref, p.ref_reads) for p in epts}, es_vae["ref"]))
        h = _calls(pipe.transformer, stores["ref"]["calls"], stores["ref"]["mmdit"])
        es.callback(h.remove)
        image = pipe(run.prompt, negative_prompt=run.negative, height=run.height, width=run.width,
                     num_inference_steps=run.steps, guidance_scale=run.guidance, output_type="pil",
                     generator=torch.Generator("cpu").manual_seed(run.seed), **kwargs).images[0]
    ref_pixels = torch.from_numpy(np.asarray(image).copy())

    # impl: the same run from its own parts
    impl_model, impl_vae = impl_model.to(run.dtype), impl_vae.to(run.dtype)
    cond = encode_prompt(stack, run.prompt, settings, run.dtype)
    unc = encode_prompt(stack, run.negative, settings, run.dtype)
    f = impl_vae.config.downscale
    shape = (1, c.in_channels, run.height // f, run.width // f)
    conds = sampling.Conditioning(cond.context, cond.pooled), sampling.Conditioning(unc.context, unc.pooled)
    with contextlib.ExitStack() as es:
        es.enter_context(LM.capture(impl_model, {p.layer: (p.impl, p.impl_reads) for p in pts},
                                    stores["impl"]["mmdit"]))
        es.enter_context(LM.capture(impl_vae, {p.layer: (p.impl, p.impl_reads) for p in vpts}, stores["impl"]["vae"]))
        if img2img:
            es.enter_context(LM.capture(impl_vae, {p.layer: (p.impl, p.impl_reads) for p in epts}, es_vae["impl"]))
        h = _calls(impl_model, stores["impl"]["calls"], stores["impl"]["mmdit"])
        es.callback(h.remove)
        keep = lambda i, d: stores["impl"]["steps"].append({k: d[k] for k in ("velocity", "latent") if k in d})  # noqa
        start = 0
        if img2img:
            s_img = sampling.SamplerSettings(steps=run.steps, guidance=run.guidance, slg_layers=run.slg_layers)
            image_in = sampling.image_to_tensor(run.init_image).to(run.dtype)
            noised, start = sampling.img2img_latent(impl_vae, image_in, s_img, run.strength,
                                                    torch.Generator("cpu").manual_seed(run.seed))
            latents = sampling.denoise(impl_model, noised, *conds, s_img, on_step=keep, start=start)
        elif opts["sampler"] == "diffusers_euler":
            noise = torch.randn(shape, dtype=run.dtype, generator=torch.Generator("cpu").manual_seed(run.seed))
            latents = sampling.denoise(impl_model, noise, *conds, sampling.SamplerSettings(
                steps=run.steps, guidance=run.guidance, slg_layers=run.slg_layers), on_step=keep)
        else:
            sai = sampling.SaiSettings(steps=run.steps, shift=3.0, guidance=run.guidance,
                                       sampler=opts["sampler"].removeprefix("sai_"), model_dtype=run.dtype,
                                       slg_layers=run.slg_layers)
            latents = sampling.sai_denoise(impl_model, sampling.sai_noise(run.seed, shape, sai.latent_dtype), *conds,
                                           sai, on_step=keep)
        image = impl_vae.decode(impl_vae.latent_out(latents).to(run.dtype))
        pixels = (sampling.to_uint8 if opts["uint8"] == "round" else sampling.sai_to_uint8)(image)[0]

    if img2img:
        base = {"model": label, "component": "vae", "step": None, "branch": None, "block": None, "stream": None}
        for p in epts:
            add({**base, "layer": p.layer}, es_vae["impl"][p.layer][0], es_vae["ref"][p.layer][0])
    _records(label, pts, vpts, stores, run, pixels, ref_pixels, add, step0=start,
             impl_cfg_order=("uncond", "cond") if opts["sampler"] == "diffusers_euler" else ("cond", "uncond"))


def _records(label, pts, vpts, stores, run, pixels, ref_pixels, add, impl_cfg_order=("uncond", "cond"),
             step0: int = 0) -> None:
    """Pair impl and reference tensors by coordinates. Branches are matched by name, so a sampler that batches
    [cond, uncond] is still compared cond with cond."""
    cfg = run.guidance > 1
    imp, ref = stores["impl"], stores["ref"]
    step_of_call, k = [], step0  # steps are schedule indices (img2img starts later)
    for call, _ in ref["calls"]:  # each step: one (CFG-batched) call, plus the skip-layer call in the SLG window
        if step_of_call and call[0].shape[0] == 1 and cfg:
            step_of_call.append(step_of_call[-1])
        else:
            step_of_call.append(k)
            k += 1
    if len(imp["calls"]) != len(ref["calls"]):
        add({"model": label, "component": "sampler", "step": None, "branch": None, "layer": "transformer_calls"},
            torch.tensor(len(imp["calls"])), torch.tensor(len(ref["calls"])))
    for n, ((icall, _), (rcall, _)) in enumerate(zip(imp["calls"], ref["calls"])):
        step = step_of_call[n]
        for b, branch in enumerate(_branches(rcall[0].shape[0], cfg)):
            base = {"model": label, "step": step, "branch": branch}
            ib = impl_cfg_order.index(branch) if branch in impl_cfg_order and icall[0].shape[0] == 2 else b
            for name, i_t, r_t in zip(("latent_in", "timestep", "context", "pooled"), icall, rcall):
                add({**base, "component": "sampler", "layer": f"input.{name}", "block": None, "stream": None},
                    i_t[ib: ib + 1], r_t[b: b + 1])
            for p in pts:
                got, want = _of_call(imp["mmdit"], imp["calls"], n, p.layer), _of_call(ref["mmdit"], ref["calls"], n, p.layer)
                if got is None and want is None:  # a skipped layer (skip-layer guidance)
                    continue
                got = got[ib: ib + 1] if got is not None else torch.empty(0)
                want = want[b: b + 1] if want is not None else torch.empty(0)
                if p.transform == "swap_halves" and want.numel():
                    want = torch.cat(want.chunk(2, dim=-1)[::-1], dim=-1)
                add({**base, "component": "mmdit", "layer": p.layer, **_coords(p.layer)}, got, want)
    for step, (i_s, r_s) in enumerate(zip(imp["steps"], ref["steps"]), start=step0):
        for name in [n for n in ("velocity", "latent") if n in i_s]:  # the x0-form samplers have no velocity
            add({"model": label, "component": "sampler", "step": step, "branch": None, "block": None, "stream": None,
                 "layer": name}, i_s[name], r_s[name])
    base = {"model": label, "component": "vae", "step": None, "branch": None, "block": None, "stream": None}
    for p in vpts:
        add({**base, "layer": p.layer}, imp["vae"][p.layer][0], ref["vae"][p.layer][0])
    add({**base, "layer": "image_uint8"}, pixels, ref_pixels)


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
