"""impl's side: the independent implementation, given plain values resolved from the run's flags."""
from __future__ import annotations

import contextlib
from pathlib import Path

from parity import naming as N
from parity import records as R
from parity.sides import ImageCapture, text_side

ENCODERS = (("clip-l", "clip_l"), ("clip-g", "clip_g"), ("t5", "t5"))


def text_points(component: str, layers: int, side: str) -> dict:
    rows = N.t5_rows(layers) if component == "t5" else N.clip_rows(layers)
    return N.points(rows, side)


def load_stack(text_model, clip_l_projection: str = "file"):
    """impl's tokenizers and encoders: the directory's folders, or the single file's ``text_encoders.*`` with
    the values no shape carries read from the directory's configs when it has them."""
    from impl.text import TextStack, load_text_stack

    if text_model.single_file is None:
        return load_text_stack(text_model.directory), []
    from impl.checkpoint import PREFIXES, load_text_encoders
    from impl.clip_tokenizer import BPEVocab
    from impl.t5_tokenizer import SentencePieceModel
    from impl.weights import read_safetensors
    from parity.convert import given_configs

    d = text_model.directory
    given = given_configs(text_model.config_dir)
    clip_l = given.get("clip_l")
    if clip_l_projection == "identity" and clip_l is not None and clip_l.projection_dim != clip_l.width:
        from parity.run import Unsupported

        raise Unsupported(f"{text_model.single_file}: with single_file_clip_l_projection=identity (what diffusers' "
                          f"from_single_file does) CLIP-L's projection is the identity, which does not fit its "
                          f"projection_dim {clip_l.projection_dim} (width {clip_l.width}); diffusers cannot load it")
    prefix = PREFIXES["text_encoders"]
    state = {k[len(prefix):]: v for k, v in read_safetensors(text_model.single_file).items() if k.startswith(prefix)}
    enc, _, notes, quantized = load_text_encoders(state, str(text_model.single_file), given, clip_l_projection)
    stack = TextStack(BPEVocab.from_dir(d / "tokenizer"), SentencePieceModel.load(d / "tokenizer_3" / "spiece.model"),
                      enc["clip_l"], enc["clip_g"], enc["t5"], quantized)
    return stack, notes


def compute_dtype(run):
    """The dtype the image side computes in: the run's, or float32 with ``half_compute=float32`` (N4)."""
    import torch

    return torch.float32 if run.values["half_compute"] == "float32" else run.dtype


def half_weights(mmdit, run, quantized: bool = False):
    """With ``half_compute=float32`` in a half-precision run, the MMDiT's weights rounded to the run dtype (stored
    in it, computed in float32: ``compute_dtype``). A scaled-fp8 file's linear layers (all of them, scaled or not)
    are stored in the dtype they compute in: not rounded."""
    if run.values["half_compute"] == "float32" and run.dtype.itemsize < 4:
        import torch

        from impl.weights import round_through

        round_through(mmdit, run.dtype, keep=(torch.nn.Linear,) if quantized else ())
    return mmdit


def load_image_parts(model, opts: dict, dtype):
    """impl's MMDiT and VAE, and whether the MMDiT's file is scaled fp8: an SAI single file by identity (impl uses
    its key names; scaled-fp8 weights dequantized in ``dtype``, the dtype they compute in, and laid out as the
    ``fp8_weight_layout`` flag says), else a diffusers directory through the naming table's weight rules."""
    from impl.mmdit import MMDiT
    from impl.vae import VAE
    from impl.weights import MODEL_WEIGHTS, load_strict, read_weights_dir

    mmdit, vae = MMDiT(model.mmdit, opts["mmdit"]), VAE(model.vae, opts["vae_attention"])
    layers: list[str] = []
    if model.single_file is not None:
        from impl import quant
        from impl.checkpoint import read_sai_checkpoint

        parts = read_sai_checkpoint(model.single_file)
        if model.family is not None:  # the cached embedded file holds what the committed manifest says
            from impl import embedded

            embedded.verify({f"mmdit-{model.family}": parts["mmdit"], "vae": parts["vae"]})
        source = f"{model.single_file} (model.diffusion_model.*)"
        if quant.is_quantized(parts["mmdit"]):
            parts["mmdit"], layers = quant.dequantize(parts["mmdit"], dtype, source)
        load_strict(mmdit, parts["mmdit"], source)
        if opts["fp8_weight_layout"] == "column_major":
            quant.column_major(mmdit, layers)
        load_strict(vae, parts["vae"], f"{model.single_file} (first_stage_model.*)")
    else:
        from parity.convert import diffusers_to_sai

        d: Path = model.directory
        load_strict(mmdit, diffusers_to_sai(read_weights_dir(d / "transformer", MODEL_WEIGHTS), model.mmdit, str(d / "transformer")),
                    str(d / "transformer"))
        load_strict(vae, diffusers_to_sai(read_weights_dir(d / "vae", MODEL_WEIGHTS), model.vae, str(d / "vae")), str(d / "vae"))
    return mmdit.eval(), vae.eval(), bool(layers)


def streamed_text_stack(text_model, dtype, clip_l_projection: str = "file"):
    """impl's text stack with each encoder streamed (``parity.stream``): parameters in ``dtype`` (T5's ``wo`` in
    float32 when it is float16, as transformers keeps them), each layer or block paged in for its call. From a
    single file's ``text_encoders.*``, T5 is streamed and the CLIP encoders are loaded whole (as ``load_stack``
    loads them; they are the small ones). Returns the stack and its pagers, by component."""
    import torch

    from impl.clip import ClipTextEncoder
    from impl.text import CLIP_DROP, TextStack, check_encoder_folder, tokenizer_files
    from impl.weights import TEXT_WEIGHTS, weight_files
    from parity.stream import Pager, Weights, meta_parameters

    d = text_model.directory
    encoders, pagers = {}, {}
    if text_model.single_file is not None:
        from impl.checkpoint import PREFIXES, TEXT_PREFIXES, infer_t5, load_text_encoders
        from parity.convert import given_configs

        f, p = text_model.single_file, PREFIXES["text_encoders"]
        w, t5p = Weights([f]), PREFIXES["text_encoders"] + TEXT_PREFIXES["t5"]
        given = given_configs(text_model.config_dir)
        clips = {k[len(p):]: w.get(k) for k in w.keys() if k.startswith(p) and not k.startswith(t5p)}
        loaded, _, _, quantized = load_text_encoders(clips, str(f), given, clip_l_projection)
        if quantized:
            raise ValueError(f"{f}: its text encoders are scaled fp8, which streamed runs do not read")
        encoders.update(clip_l=loaded["clip_l"], clip_g=loaded["clip_g"])
        del clips, loaded
        shapes = w.shapes(t5p)
        where = f"{f} (text_encoders.{TEXT_PREFIXES['t5']}*)"
        cfg, _ = infer_t5({k: torch.empty(v, device="meta") for k, v in shapes.items()}, where, given.get("t5"))
        encoders["t5"], pagers["t5"] = _streamed_t5(cfg, shapes, lambda k: w.get(t5p + k), where, dtype)
    else:
        for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5")):
            if not (d / sub).is_dir():
                encoders[name] = None
                continue
            w = Weights(weight_files(d / sub, TEXT_WEIGHTS))
            shapes = w.shapes()
            cfg = check_encoder_folder(d / sub, {k: torch.empty(v, device="meta") for k, v in shapes.items()})
            if name == "t5":
                encoders[name], pagers[name] = _streamed_t5(cfg, shapes, w.get, str(d / sub), dtype)
                continue
            with meta_parameters():
                model = ClipTextEncoder(cfg)
            units = [f"text_model.encoder.layers.{i}" for i in range(cfg.layers)]
            pagers[name] = Pager(model, units, w.get, shapes, lambda k, t: dtype if t.is_floating_point() else t.dtype,
                                 str(d / sub), set(CLIP_DROP))
            encoders[name] = model.eval()
    return TextStack(*tokenizer_files(d), encoders["clip_l"], encoders["clip_g"], encoders["t5"]), pagers


def _streamed_t5(cfg, shapes: dict, fetch, what: str, dtype):
    """impl's T5 on the meta device and its pager: ``shapes`` and ``fetch`` give the stored tensors under
    transformers' names (the tied embedding under either name); block 0's position-bias table stays resident,
    because impl reads it before the blocks run."""
    import torch

    from impl.t5 import T5Encoder
    from impl.text import T5_TIED
    from parity.stream import Pager, meta_parameters

    (ours, theirs), = T5_TIED.items()
    shapes, ignore = dict(shapes), set()
    if ours in shapes:
        ignore.add(theirs)
    else:  # only the tied name stored: impl's parameter reads it
        shapes[ours] = shapes.pop(theirs)
        fetch = lambda k, get=fetch: get(theirs if k == ours else k)  # noqa: E731
    with meta_parameters():
        model = T5Encoder(cfg)

    def dtype_of(k, t):
        if not t.is_floating_point():
            return t.dtype
        return torch.float32 if dtype == torch.float16 and k.endswith("DenseReluDense.wo.weight") else dtype
    bias = ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    pager = Pager(model, [f"encoder.block.{i}" for i in range(cfg.layers)], fetch, shapes, dtype_of, what, ignore,
                  resident=bias)
    return model.eval(), pager


def streamed_image_parts(model, opts: dict, dtype):
    """impl's MMDiT and VAE streamed (``parity.stream``): the MMDiT block by block, its parameters in ``dtype``; the
    VAE stage by stage (each block of its levels and of its middle, as ``stages()`` runs them), its parameters in
    float32 as when it is loaded whole (a run casts it with ``vae.to``); from the SAI single file by identity or
    from the diffusers directory through the naming table's rules. Returns (mmdit, vae, pagers by part)."""
    import torch

    from impl.checkpoint import PREFIXES
    from impl.mmdit import MMDiT
    from impl.vae import VAE
    from impl.weights import MODEL_WEIGHTS, weight_files
    from parity.convert import combiner, diffusers_to_sai, mmdit_rules, vae_rules
    from parity.stream import Pager, Weights, meta_parameters

    whole = Weights([model.single_file]) if model.single_file is not None else None

    def source(part: str, config, rules):  # (shapes, fetch, what) of one part under impl's names
        if whole is not None:
            w, prefix = whole, PREFIXES[part]
            return w.shapes(prefix), lambda k: w.get(prefix + k), f"{model.single_file} ({prefix}*)"
        d = model.directory / ("transformer" if part == "mmdit" else "vae")
        w, what = Weights(weight_files(d, MODEL_WEIGHTS)), str(d)
        meta = {k: torch.empty(v, device="meta") for k, v in w.shapes().items()}
        shapes = {k: tuple(v.shape) for k, v in diffusers_to_sai(meta, config, what).items()}  # names, shapes
        by = {r.sai: r for r in rules(config)}
        return shapes, lambda k: combiner(by[k])([w.get(x) for x in by[k].diffusers]), what

    with meta_parameters():
        mmdit, vae = MMDiT(model.mmdit, opts["mmdit"]), VAE(model.vae, opts["vae_attention"])
    in_dtype = lambda d: lambda k, t: d if t.is_floating_point() else t.dtype  # noqa: E731
    shapes, fetch, what = source("mmdit", model.mmdit, mmdit_rules)
    pagers = {"mmdit": Pager(mmdit, [f"joint_blocks.{i}" for i in range(model.mmdit.depth)], fetch, shapes,
                             in_dtype(dtype), what)}
    shapes, fetch, what = source("vae", model.vae, vae_rules)
    stages = [f"{part}.{name}" for part in ("encoder", "decoder") for name, _ in getattr(vae, part).stages()
              if name.startswith(("down.", "mid.", "up."))]
    pagers["vae"] = Pager(vae, stages, fetch, shapes, in_dtype(torch.float32), what)
    return mmdit.eval(), vae.eval(), pagers


def nonfinite(module, where: str) -> list[str]:
    """A warning naming the weights (as impl loaded them) that hold NaN or Inf; every side reads the same values."""
    import torch

    if module is None:
        return []
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in module.state_dict().items() if v.is_floating_point()]
    bad = [(k, n) for k, n in bad if n]
    if not bad:
        return []
    return [f"{where}: {len(bad)} weights hold NaN or Inf: " + ", ".join(f"{k} ({n})" for k, n in bad[:5])
            + (" ..." if len(bad) > 5 else "")]


def sampler_settings(run, model):
    """impl's sampler settings for one image model of the run."""
    from impl import sampling

    s = run.spec
    start, stop = run.opts["slg_window"]
    return sampling.SamplerSettings(steps=s.steps, shift=model.shift["impl"], guidance=s.guidance,
                                    dtype=compute_dtype(run), slg_layers=s.slg, slg_start=start, slg_stop=stop,
                                    negative_zero=s.negative_zero, form=run.opts["form"])


class ImplSide:
    name = "impl"
    covers = None  # every component

    def __init__(self):
        self._stack, self._pagers, self._conds = None, {}, {}

    def key(self, run) -> tuple:
        return (repr(run.spec), tuple(sorted(run.values.items(), key=str)))

    def stack(self, run):
        if self._stack is None and run.spec.stream:
            self._stack, self._pagers = streamed_text_stack(run.text_model, run.text.encoder_dtype or run.dtype,
                                                            run.values["single_file_clip_l_projection"])
        if self._stack is None:
            self._stack, notes = load_stack(run.text_model, run.values["single_file_clip_l_projection"])
            if run.text_model.label == "embedded-default":  # the cached files hold what the manifest says
                from impl import embedded

                embedded.verify({k: getattr(self._stack, k).state_dict() for k in ("clip_l", "clip_g", "t5")})
            run.notes.extend(notes)
            for name in ("clip_l", "clip_g", "t5"):
                run.warnings += nonfinite(getattr(self._stack, name), f"{run.text_model.label} {name}")
        return self._stack

    def sources(self, run) -> dict:
        return {"files": run.sources(single_files=True)}

    def text(self, run) -> R.Side:
        from impl.text import encode_prompt
        from parity.run import unpadded

        stack, settings = self.stack(run), run.text
        out_dtype = settings.encoder_dtype or run.dtype
        models = {comp: stack.encoder(attr, out_dtype, settings.weight_storage) for comp, attr in ENCODERS}
        models = {c: m for c, m in models.items() if m is not None and not (c == "t5" and settings.t5_absent)}
        points = {c: text_points(c, m.config.layers, "impl") for c, m in models.items()}
        states = {c: self._pagers[a].state() for c, a in ENCODERS if c in models and a in self._pagers}

        def encode(prompt):
            cond = encode_prompt(stack, prompt, settings, out_dtype, run.text_model.joint_dim,
                                 unpadded(run.spec, prompt))
            if run.spec.stream and prompt == run.spec.prompts[0]:  # the image run's: not encoded (paged) twice
                self._conds[prompt] = cond
            return cond.context, cond.pooled
        out = text_side(run.text_model.label, run.spec.prompts, models, points, encode, "ids", run.dtype,
                        states=states or None)
        for p in self._pagers.values():
            p.finish()
        run.notes.extend(self._pagers[a].summary(f"impl {c}") for c, a in ENCODERS if a in self._pagers)
        return out

    def image(self, run, model, init) -> R.Side:
        from impl import sampling
        from impl.pipeline import PipelineSettings, generate
        from parity.run import unpadded

        s, opts = run.spec, run.opts
        form = opts["form"]
        stack = self.stack(run)
        if s.stream:
            mmdit, vae, pagers = streamed_image_parts(model, opts, compute_dtype(run))
            mmdit_state, vae_state = pagers["mmdit"].state(), pagers["vae"].state()
        else:
            mmdit, vae, quantized = load_image_parts(model, opts, compute_dtype(run))
            mmdit = half_weights(mmdit, run, quantized)
            run.warnings += nonfinite(mmdit, f"{model.label} mmdit") + nonfinite(vae, f"{model.label} vae")
            mmdit_state, vae_state = mmdit.state_dict(), vae.state_dict()
        ss = sampler_settings(run, model)
        ps = PipelineSettings(sampler=ss, seed=s.seed, height=s.height, width=s.width, strength=s.strength,
                              uint8=opts["uint8"], autocast=opts["autocast"],
                              unpadded_negative=s.empty_padding == "none",
                              unpadded_prompt=unpadded(s, s.prompts[0]))
        image, start, plan = None, 0, ss
        if init is not None:  # the layout of each reference's preprocessing (S7)
            to_tensor = sampling.sai_image_to_tensor if form.img2img == "noise_scaling" else sampling.image_to_tensor
            image = to_tensor(init)
            plan, start = sampling.img2img_plan(ss, s.strength)
        cap = ImageCapture(model.label, "impl", model.mmdit, model.vae, init is not None)
        cap.weights(mmdit_state, vae_state, run.dtype)
        with contextlib.ExitStack() as es:
            cap.attach(es, mmdit, vae, lambda a, k: (a[0], a[1], a[3], a[2]), f"{model.label} mmdit (impl)",
                       N.MMDIT_SKIP["impl"])
            cap.schedule(sampling.sigmas(plan)[start:])
            width = run.text_model.joint_dim or (stack.t5.config.d_model if stack.t5 is not None else None)
            result = generate(stack, mmdit, vae, s.prompts[0], ps, run.text, "", image,
                              on_step=lambda i, d: cap.step(**{form.cfg_space: d[form.cfg_space], "latent": d["latent"]}),
                              cond=self._conds.get(s.prompts[0]) if width == model.mmdit.context_dim
                              and (run.text.encoder_dtype or run.dtype) == ps.sampler.dtype else None)
        order = ("uncond", "cond") if form.cfg_batch == "uncond_first" else ("cond", "uncond")
        if s.stream:
            for part, pager in pagers.items():
                pager.finish()
                run.notes.append(pager.summary(f"impl {model.label} {part}"))
        return cap.assemble(result.image, order, start)
