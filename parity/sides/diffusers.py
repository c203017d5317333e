"""The diffusers / transformers side: models built by their own loaders from the model's files and run by
diffusers' own procedure (``StableDiffusion3Pipeline.encode_prompt`` and ``__call__``, or the img2img pipeline).

Loading: a diffusers directory through ``from_pretrained`` (each text encoder through transformers' own
``from_pretrained`` for the text-only comparison); an SAI single file through diffusers' ``from_single_file`` with
``config=`` the model's configs (``--config`` or the diffusers directory beside the file: offline, diffusers can
take them from nowhere else). Imports of the reference libraries stay inside functions.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from parity import naming as N
from parity import records as R
from parity.determinism import own_storage
from parity.run import Unsupported
from parity.sides import ImageCapture, text_side
from parity.sides.impl import text_points

TEXT = (("clip-l", "text_encoder", "tokenizer"), ("clip-g", "text_encoder_2", "tokenizer_2"),
        ("t5", "text_encoder_3", "tokenizer_3"))
_CLIP_UNITS = lambda m: [f"text_model.encoder.layers.{i}" for i in range(m.config.num_hidden_layers)]  # noqa: E731
TEXT_UNITS = {"text_encoder": _CLIP_UNITS, "text_encoder_2": _CLIP_UNITS,  # streamed: paged one at a time
              "text_encoder_3": lambda m: [f"encoder.block.{i}" for i in range(m.config.num_layers)]}


def _vae_units(m) -> list[str]:
    """An ``AutoencoderKL``'s stages, streamed: each down and up block and the middle block of its coders."""
    out = []
    for part in ("encoder", "decoder"):
        coder = getattr(m, part)
        out += [f"{part}.{kind}.{i}" for kind in ("down_blocks", "up_blocks") for i in range(len(getattr(coder, kind, ())))]
        out.append(f"{part}.mid_block")
    return out


def _quiet():
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as hf_logging

    for lg in (d_logging, hf_logging):
        lg.set_verbosity_error()
        lg.disable_progress_bar()


def _need_configs(path: Path, config_dir: Path | None) -> None:
    if config_dir is None or not (config_dir / "model_index.json").is_file():
        raise Unsupported(f"{path}: diffusers' from_single_file needs the model's configs, and offline it can take "
                          "them only from a diffusers directory with model_index.json: give --config DIR (or put the "
                          "file in its diffusers repository)")


def _from_single_file(cls, path: Path, config_dir: Path | None, dtype: torch.dtype, **kw):
    _need_configs(path, config_dir)
    try:
        return cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **kw)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise Unsupported(f"{path}: diffusers' from_single_file refused it: {str(e).splitlines()[0]}") from None


def streamed(cls, folder: Path, base: str | None, units, dtype: torch.dtype, pagers: dict, name: str, weights=None):
    """A model of the library's own class ``cls`` built from ``folder``'s config with its parameters on the meta
    device, and a ``parity.stream.Pager`` giving it ``folder``'s weights (``base`` names the files; or ``weights``,
    anything with ``get`` and ``shapes``, e.g. a single file through the library's converter) in ``dtype``, each
    of ``units(model)`` for the length of its call; the pager goes into ``pagers[name]``. Float16 models keep
    transformers' ``_keep_in_fp32_modules`` in float32, as its ``from_pretrained`` and diffusers' single-file
    loader do."""
    from impl.weights import weight_files
    from parity.stream import Pager, Weights, meta_parameters

    with meta_parameters():
        if hasattr(cls, "load_config"):  # diffusers
            model = cls.from_config(cls.load_config(folder))
        else:
            model = cls._from_config(cls.config_class.from_pretrained(folder))
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()

    def dtype_of(k, t):
        if not t.is_floating_point():
            return t.dtype
        return torch.float32 if keep & set(k.split(".")) else dtype
    w = weights if weights is not None else Weights(weight_files(folder, base))
    pagers[name] = Pager(model, units(model), w.get, w.shapes(), dtype_of, getattr(w, "what", str(folder)))
    return model


def _unit(pattern: str):
    """The unit of a name: ``pattern``'s match, with its number, as the pager names the unit."""
    import re

    rx = re.compile(pattern)

    def unit(k: str) -> str | None:
        m = rx.match(k)
        return None if m is None else m.group(1)
    return unit


def streamed_single_file(model, text_model, dtype: torch.dtype, pagers: dict, text=None) -> dict:
    """The parts of an SAI single file's pipeline as diffusers' ``from_single_file`` builds them, streamed: the
    transformer from its config in the model's directory, its weights converted by diffusers' own single-file
    mapping one block at a time (``parity.stream.Converted``); the VAE by diffusers' own single-file loader on its
    part of the file, whole; the text encoders as ``single_file_text`` gives them (or the model's folders', when
    the file has none; ``text``: a text pipeline already built for the run)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from impl.checkpoint import PREFIXES
    from parity.stream import Converted, Weights

    d, f = model.directory, model.single_file
    w = Weights([f])
    mapping = SINGLE_FILE_LOADABLE_CLASSES["SD3Transformer2DModel"]["checkpoint_mapping_fn"]
    conv = Converted(w, [k for k in w.keys() if k.startswith(PREFIXES["mmdit"])], mapping,
                     _unit(r"model\.diffusion_model\.joint_blocks\.(\d+)\."), _unit(r"transformer_blocks\.(\d+)\."),
                     f"{f} (model.diffusion_model.*, diffusers' {mapping.__name__})")
    blocks = lambda m: [f"transformer_blocks.{i}" for i in range(len(m.transformer_blocks))]  # noqa: E731
    parts = {"transformer": streamed(SD3Transformer2DModel, d / "transformer", None, blocks, dtype, pagers,
                                     "transformer", conv),
             "vae": AutoencoderKL.from_single_file({k: w.get(k) for k in w.keys() if k.startswith(PREFIXES["vae"])},
                                                   config=str(d), subfolder="vae", torch_dtype=dtype,
                                                   local_files_only=True)}
    t = text if text is not None else text_pipeline(text_model, dtype, pagers)
    return parts | {sub: getattr(t, sub) for _, sub, _ in TEXT} | {tok: getattr(t, tok) for _, _, tok in TEXT}


def single_file_text(text_model, dtype: torch.dtype, pagers: dict) -> dict:
    """A single file's text encoders as diffusers' ``from_single_file`` builds them, T5 streamed: CLIP-L and
    CLIP-G by diffusers' own ``create_diffusers_clip_model_from_ldm`` on the file's CLIP tensors (whole: the
    small ones), T5 from its config with its weights converted by diffusers' own
    ``convert_sd3_t5_checkpoint_to_diffusers`` one block at a time; the tokenizers from the configs' directory."""
    from diffusers.loaders.single_file_utils import (convert_sd3_t5_checkpoint_to_diffusers,
                                                     create_diffusers_clip_model_from_ldm)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    from impl.checkpoint import PREFIXES
    from parity.stream import Converted, Weights

    f, cfg = text_model.single_file, text_model.config_dir
    _need_configs(f, cfg)
    w, p = Weights([f]), PREFIXES["text_encoders"]
    clips = {k: w.get(k) for k in w.keys() if k.startswith(p + "clip_")}
    parts = {sub: create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, clips, subfolder=sub,
                                                       config=str(cfg), torch_dtype=dtype, local_files_only=True)
             for sub in ("text_encoder", "text_encoder_2")}
    del clips
    t5 = Converted(w, [k for k in w.keys() if k.startswith(p + "t5xxl.")], convert_sd3_t5_checkpoint_to_diffusers,
                   _unit(r"text_encoders\.t5xxl\.transformer\.encoder\.block\.(\d+)\."),
                   _unit(r"encoder\.block\.(\d+)\."),
                   f"{f} (text_encoders.t5xxl.*, diffusers' convert_sd3_t5_checkpoint_to_diffusers)")
    parts["text_encoder_3"] = streamed(T5EncoderModel, cfg / "text_encoder_3", None, TEXT_UNITS["text_encoder_3"],
                                       dtype, pagers, "text_encoder_3", t5)
    return parts | {"tokenizer": CLIPTokenizer.from_pretrained(cfg / "tokenizer"),
                    "tokenizer_2": CLIPTokenizer.from_pretrained(cfg / "tokenizer_2"),
                    "tokenizer_3": T5Tokenizer.from_pretrained(cfg / "tokenizer_3")}


def text_pipeline(text_model, dtype: torch.dtype, pagers: dict | None = None):
    """A ``StableDiffusion3Pipeline`` holding only the text parts, each loaded by its own library (with
    ``pagers``, streamed: ``streamed``)."""
    _quiet()
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    d = text_model.directory
    if text_model.single_file is not None and pagers is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None,
                                            **single_file_text(text_model, dtype, pagers))
    elif text_model.single_file is not None:
        pipe = _from_single_file(StableDiffusion3Pipeline, text_model.single_file, text_model.config_dir, dtype,
                                 transformer=None, vae=None, scheduler=None)
    else:
        parts = {}
        for _, sub, tok in TEXT:
            if sub == "text_encoder_3" and not text_model.has_t5:
                parts[sub] = parts[tok] = None  # an SD3 model without T5 (QUIRKS T10)
                continue
            cls = T5EncoderModel if sub == "text_encoder_3" else CLIPTextModelWithProjection
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if pagers is not None:
                    from impl.weights import TEXT_WEIGHTS

                    parts[sub] = streamed(cls, d / sub, TEXT_WEIGHTS, TEXT_UNITS[sub], dtype, pagers, sub)
                else:
                    parts[sub] = cls.from_pretrained(d / sub, dtype=dtype, use_safetensors=True)
            parts[tok] = (T5Tokenizer if tok == "tokenizer_3" else CLIPTokenizer).from_pretrained(d / tok)
        pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **parts)
    for _, sub, _ in TEXT:
        if getattr(pipe, sub) is not None:
            own_storage(getattr(pipe, sub).eval())
    if pipe.text_encoder_3 is None:  # diffusers reads the zero rows' width from transformer.config
        pipe.transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=text_model.joint_dim))
    return pipe


def image_pipeline(model, run, img2img: bool, pagers: dict | None = None, text=None):
    """The run's diffusers pipeline for ``model`` (with ``pagers``, streamed; ``text``: the streamed text pipeline
    the run built already, whose encoders it takes instead of building them again)."""
    _quiet()
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    dtype = run.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pagers is not None:  # streamed: the transformer, T5 (and from folders the CLIPs and the VAE) paged
            import json

            import diffusers
            from diffusers import AutoencoderKL, SD3Transformer2DModel

            from impl.weights import MODEL_WEIGHTS

            d = model.directory
            if model.weights_in_directory:
                t = text if text is not None else text_pipeline(run.text_model, dtype, pagers)
                parts = {sub: getattr(t, sub) for _, sub, _ in TEXT} | {tok: getattr(t, tok) for _, _, tok in TEXT}
                parts["transformer"] = streamed(
                    SD3Transformer2DModel, d / "transformer", MODEL_WEIGHTS,
                    lambda m: [f"transformer_blocks.{i}" for i in range(len(m.transformer_blocks))], dtype, pagers,
                    "transformer")
                parts["vae"] = streamed(AutoencoderKL, d / "vae", MODEL_WEIGHTS, _vae_units, dtype, pagers, "vae")
            else:
                _need_configs(model.single_file, d)
                parts = streamed_single_file(model, run.text_model, dtype, pagers, text)
            pipe = cls(scheduler=getattr(diffusers, json.loads((d / "model_index.json").read_text())["scheduler"][1])
                       .from_pretrained(d / "scheduler"), **parts)
        elif not model.weights_in_directory:
            text = {}
            if run.text_model.single_file is None:  # the file has no text encoders: the model directory's
                t = text_pipeline(run.text_model, dtype)
                text = {sub: getattr(t, sub) for _, sub, _ in TEXT} | {tok: getattr(t, tok) for _, _, tok in TEXT}
            pipe = _from_single_file(cls, model.single_file, model.directory, dtype, **text)
        else:
            kw = {} if run.text_model.has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
            pipe = cls.from_pretrained(model.directory, dtype=dtype, use_safetensors=True, **kw)
    # measured: diffusers 0.42.1 without accelerate leaves SD3Transformer2DModel in float32 under dtype=bfloat16
    # (the VAE and text encoders are cast); cast it explicitly, the same rounding a dtype-converting load does.
    # Only it: pipe.to() would also cast the float32 T5 `wo` layers transformers keeps in float16 runs.
    pipe.transformer.to(dtype)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if part is not None:
            own_storage(part.eval())
    pipe.set_progress_bar_config(disable=True)
    if pipe.scheduler.config.shift != model.shift["diffusers"]:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=model.shift["diffusers"])
    return pipe


def texts(prompt) -> tuple:
    """``prompt``, ``prompt_2`` (CLIP-G) and ``prompt_3`` (T5) of diffusers' pipeline: None is the prompt."""
    return (prompt, None, None) if isinstance(prompt, str) else prompt


class DiffusersSide:
    name = "diffusers"
    covers = None  # every component

    def __init__(self):
        self._conds = {}  # streamed: the first prompt's (context, pooled) from the text run
        self._text = None  # streamed: the text run's pipeline, whose encoders the image runs take

    def key(self, run) -> tuple:
        s = run.spec
        return (s.model, s.checkpoint, s.config, s.prompts, s.dtype, s.threads, s.families, s.steps, s.guidance,
                s.seed, s.height, s.width, s.image, s.strength, s.slg, s.text_only, s.stream,
                run.values["t5_max_length"], tuple((m.label, m.shift["diffusers"]) for m in run.models),
                run.dtype)

    def sources(self, run) -> dict:
        from importlib.metadata import version

        return {"files": run.sources(single_files=False), "diffusers": version("diffusers"), "transformers": version("transformers")}

    def text(self, run) -> R.Side:
        pagers = {} if run.spec.stream else None
        pipe = text_pipeline(run.text_model, run.dtype, pagers)
        encoders = {c: getattr(pipe, sub) for c, sub, _ in TEXT if getattr(pipe, sub) is not None}
        points = {}
        for comp, model in encoders.items():
            layers = model.config.num_layers if comp == "t5" else model.config.num_hidden_layers
            pts = text_points(comp, layers, "diffusers")
            if comp == "t5" and "encoder.embed_tokens" not in dict(model.named_modules()):
                pts = N.points(N.t5_rows(layers, ref_embed="shared"), "diffusers")  # transformers 4.x
            N.check_coverage(pts, model, (N.T5_SKIP if comp == "t5" else N.CLIP_SKIP)["diffusers"],
                             f"{comp} (transformers)")
            points[comp] = pts

        def encode(prompt):
            context, _, pooled, _ = pipe.encode_prompt(*texts(prompt), do_classifier_free_guidance=False,
                                                       max_sequence_length=run.values["t5_max_length"])
            if run.spec.stream and prompt == run.spec.prompts[0]:  # the image run's: not encoded (paged) twice
                self._conds[prompt] = context, pooled
            return context, pooled
        states = {c: pagers[sub].state() for c, sub, _ in TEXT if c in encoders and sub in (pagers or {})}
        out = text_side(run.text_model.label, run.spec.prompts, encoders, points, encode, "input_ids", run.dtype,
                        states=states or None)
        for p in (pagers or {}).values():
            p.finish()
        run.notes.extend(p.summary(f"diffusers {sub}") for sub, p in (pagers or {}).items())
        if run.spec.stream:
            self._text = pipe
        return out

    def image(self, run, model, init) -> R.Side:
        s = run.spec
        pagers = {} if s.stream else None
        pipe = image_pipeline(model, run, init is not None, pagers, self._text)
        cap = ImageCapture(model.label, "diffusers", model.mmdit, model.vae, init is not None)
        from parity.convert import combiner, diffusers_to_sai, mmdit_rules, vae_rules  # the naming table's rules

        states = {}
        for part, name, config, rules in (("transformer", "mmdit", model.mmdit, mmdit_rules),
                                          ("vae", "vae", model.vae, vae_rules)):
            if part in (pagers or {}):  # read through the pager: each unit paged in once for its records
                from parity.stream import LazyState

                states[name] = LazyState([(r.sai, pagers[part], list(r.diffusers), combiner(r)) for r in rules(config)])
            else:
                states[name] = diffusers_to_sai(getattr(pipe, part).state_dict(), config,
                                                f"{model.label} {part} (diffusers)")
        cap.weights(states["mmdit"], states["vae"], run.dtype)
        ref_step = pipe.scheduler.step  # wrapped to see the guided velocity and the new latent

        def step(model_output, t, sample, **kw):
            out = ref_step(model_output, t, sample, **kw)
            cap.step(velocity=model_output, latent=out[0])
            return out
        pipe.scheduler.step = step

        def schedule(_m, args, kwargs):  # before the first call: the sigmas the loop runs
            if cap.sigmas is None:
                cap.schedule(pipe.scheduler.sigmas[pipe.scheduler.begin_index or 0:])
        kwargs = {"skip_guidance_layers": list(s.slg)} if s.slg else {}
        if init is not None:
            from PIL import Image

            kwargs.update(image=Image.fromarray(init), strength=s.strength)
        with contextlib.ExitStack() as es:
            es.callback(pipe.transformer.register_forward_pre_hook(schedule, with_kwargs=True).remove)
            cap.attach(es, pipe.transformer, pipe.vae, lambda a, k: (k["hidden_states"], k["timestep"],
                                                                     k["encoder_hidden_states"], k["pooled_projections"]),
                       f"{model.label} mmdit (diffusers)", N.MMDIT_SKIP["diffusers"])
            given = self._conds.get(s.prompts[0])  # streamed: the text run's encoding of it, by the same encoders
            if given is not None:
                kwargs.update(prompt_embeds=given[0], pooled_prompt_embeds=given[1])
            else:
                kwargs.update(zip(("prompt", "prompt_2", "prompt_3"), texts(s.prompts[0])))
            image = pipe(negative_prompt="", height=s.height, width=s.width,
                         num_inference_steps=s.steps, guidance_scale=s.guidance, output_type="pil",
                         max_sequence_length=run.values["t5_max_length"],
                         generator=torch.Generator("cpu").manual_seed(s.seed), **kwargs).images[0]
        for part in ("transformer", "vae"):
            if part in (pagers or {}):
                pagers[part].finish()
                run.notes.append(pagers[part].summary(f"diffusers {model.label} {part}"))
        return cap.assemble(torch.from_numpy(np.asarray(image).copy()), ("uncond", "cond"), s.steps - len(cap.steps))
