"""Teacher forcing: impl's units run on the reference's own inputs, so every record has a *local* error (what impl
adds at that point, given what the reference had there) beside its *propagated* one (what reaches it through
impl's own earlier outputs). An error is introduced where the local error is; records downstream only inherit it.

The units, each fed the reference's records of its inputs (already in impl's form):

* CLIP: the embeddings (on the reference's ids), each layer, the final LayerNorm, the projection of the pooled
  state; T5: the embedding, the position-bias lookup, each block (with the reference's bias table), the final
  RMSNorm; the conditioning (context and pooled) from the encoders' outputs;
* MMDiT, per call (step and CFG branch): the embedding stage (image tokens, timestep and pooled embedders, c, the
  context embedder) on the call's inputs, each joint block on the previous block's two streams and c (a block the
  call skipped is skipped), the final layer, the unpatchified output;
* the sampler, per step: impl's step (timestep, CFG, skip-layer guidance, update) from the reference's latent
  before the step and the reference's model outputs of that step, which gives the step's model inputs, its guided
  output and its new latent;
* the VAE: each encoder and decoder module (``Encoder.stages`` / ``Decoder.stages``) on the reference's previous
  module output; the decoder's first on the reference's last latent; the uint8 image from the reference's pixels.

Records no unit computes are *sources*: loaded parameters, token ids, the sigma schedule and the start latent
(the noise; for img2img it also holds the encoded image). Their local value is impl's own, so an error there is
introduced there. Sub-records of a unit (a block's q, k, v, ...) are captured while the unit runs: within a unit,
the first one with local error is where it starts.
"""
from __future__ import annotations

import contextlib

from parity import layermap as LM
from parity import naming as N
from parity import records as R


def local_side(run, impl: R.Side, ref: R.Side) -> R.Side:
    """impl's records of every unit run on ``ref``'s inputs, plus the sources taken from ``impl``; keyed as both."""
    import torch

    from parity.determinism import pinned

    rec = R.Recorder()
    with pinned(run.spec.threads), torch.no_grad():
        _text(run, ref, rec)
        for model in run.models:
            _image(run, model, ref, rec)
    out = rec.side()
    starts = {}
    for fields, _ in ref.values():
        if fields["layer"] == "input.latent_in":
            starts[fields["model"]] = min(starts.get(fields["model"], fields["step"]), fields["step"])
    for k, (fields, t) in impl.items():
        first_latent = fields["layer"] == "input.latent_in" and fields["step"] == starts.get(fields["model"])
        if k not in out and (source(fields) or first_latent):
            out[k] = (fields, t)
    return out


def source(fields: dict) -> bool:
    """A record no unit computes from an earlier record: its local error is its error."""
    return R.is_weight(fields) or fields["layer"] in ("input_ids", "sigmas")


class _Units:
    """Runs units of one module with its mapped points hooked and puts what they capture as records. ``batch``:
    the fields of each batch element (the CFG branches of one MMDiT call), None for a batch of one record."""

    def __init__(self, rec: R.Recorder, module, points: dict, batch: list[dict] | None = None, **where):
        self.rec, self.module, self.points, self.where, self.batch = rec, module, points, where, batch

    def __call__(self, fn, *args):
        store: dict[str, list] = {}
        with LM.capture(self.module, self.points, store, self.rec.tick, lambda t: self.rec.keep(t, copy=True)):
            result = fn(*args)
        for layer, got in store.items():
            self.put(layer, got[0][1], got[0][0])
        return result

    def put(self, layer: str, t, at: int | None = None) -> None:
        if self.batch is None:
            self.rec.put(t, at=at, layer=layer, **self.where)
        for b, fields in enumerate(self.batch or ()):
            self.rec.put(R.rows(t, b, b + 1), at=at, sub=b, layer=layer, **self.where, **fields)


def _getter(ref: R.Side, **where):
    def get(layer: str, **more):
        hit = ref.get(R.key({**where, "layer": layer, **more}))
        return None if hit is None else R.load(hit[1])
    return get


def _chain(units: _Units, get, first, stages) -> None:
    """Stages ``(record, fn)`` of a chain: each run on the reference's output of the one before (``first`` for
    the first); the chain stops where the reference has no record."""
    prev = first
    for record, fn in stages:
        if prev is None:
            return
        units(fn, prev)
        prev = get(record)


# ---------------------------------------------------------------------------------------------- text

def _text(run, ref: R.Side, rec: R.Recorder) -> None:
    import torch

    from impl.clip import ClipOutput, pooled_index
    from impl.text import clip_result, conditioning, encoder_rows, t5_result, without_clip
    from parity.run import unpadded
    from parity.sides.impl import ENCODERS, load_stack, streamed_text_stack, text_points

    settings, label = run.text, run.text_model.label
    dtype = settings.encoder_dtype or run.dtype
    pagers = {}
    if run.spec.stream:  # each layer / block paged in for its unit's call, as in the propagated run
        stack, pagers = streamed_text_stack(run.text_model, dtype, run.values["single_file_clip_l_projection"])
    else:
        stack, _ = load_stack(run.text_model, run.values["single_file_clip_l_projection"])
    encoders = {comp: stack.encoder(attr, dtype, settings.weight_storage) for comp, attr in ENCODERS}
    for pi, prompt in enumerate(run.spec.prompts):
        outs: dict = {}
        plan = encoder_rows(stack, prompt, settings, unpadded(run.spec, prompt))  # impl's own batch layout (a source)
        for comp, enc in encoders.items():
            get = _getter(ref, model=label, prompt=pi, component=comp)
            ids = get("input_ids")
            if enc is None or ids is None or comp not in plan:
                continue
            rows, sections = plan[comp]
            first = get("embed" if comp == "t5" else "token_embedding")  # the reference's batch: one row a sequence
            b = first.shape[0] if first is not None and first.dim() == 3 and ids.numel() % first.shape[0] == 0 else 1
            ids = ids.reshape(b, -1)
            n = enc.config.layers
            units = _Units(rec, enc, text_points(comp, n, "impl"), model=label, prompt=pi, component=comp)
            if comp == "t5":
                units(enc.shared, ids)
                attn = enc.encoder.block[0].layer[0].SelfAttention
                units(attn.position_bias, ids.shape[1])
                table = get("relative_attention_bias")
                mask = None
                if settings.t5_mask:
                    mask = ids != stack.t5_tokenizer(settings.t5_mode).pad_id
                bias = None if table is None else enc.attention_bias(ids.shape[1], mask, table)
                stages = [(f"block.{i}", lambda x, b=b: b(x, bias, settings.t5_attention, settings.t5_activation))
                          for i, b in enumerate(enc.encoder.block)] if bias is not None else []
                _chain(units, get, get("embed"), stages + [("final_layer_norm", enc.encoder.final_layer_norm)])
                last = get("final_layer_norm")
                outs[comp] = None if last is None or last.shape[0] != len(rows) else t5_result(last, rows, sections)
                continue
            units(enc.text_model.embeddings, ids)
            tm = enc.text_model
            stages = [(f"layers.{i}", lambda x, la=layer: la(x, settings.clip_attention))
                      for i, layer in enumerate(tm.encoder.layers)]
            _chain(units, get, get("embeddings"), stages + [("final_layer_norm", tm.final_layer_norm)])
            last = get("final_layer_norm")
            if last is None:
                continue
            pooled = last[torch.arange(last.shape[0]), pooled_index(ids, settings.clip_pool, enc.config.eos_id)]
            units(enc.text_projection, pooled)
            penultimate, projected = get(f"layers.{n - 2}"), get("text_projection")
            if penultimate is not None and projected is not None and penultimate.shape[0] == len(rows):
                outs[comp] = clip_result(ClipOutput(last, penultimate, pooled, projected), rows, sections)
        if "clip-l" in outs and "clip-g" in outs and (settings.t5_absent is not None or outs.get("t5") is not None):
            width = run.text_model.joint_dim or (stack.t5.config.d_model if stack.t5 is not None else None)
            context, pooled, _ = conditioning(outs["clip-l"], outs["clip-g"], outs.get("t5"), settings, dtype, width)
        elif not {"clip-l", "clip-g"} & set(plan) and outs.get("t5") is not None:  # empty unpadded CLIP texts
            context, pooled = without_clip(stack, outs["t5"], settings, dtype)
        else:
            continue
        where = {"model": label, "prompt": pi, "component": "conditioning"}
        rec.put(context, layer="context", **where)
        rec.put(pooled, layer="pooled", **where)
    run.notes.extend(pagers[a].summary(f"impl {c} (teacher forcing)") for c, a in ENCODERS if a in pagers)


# ---------------------------------------------------------------------------------------------- image

def _image(run, model, ref: R.Side, rec: R.Recorder) -> None:
    import torch

    from impl import sampling
    from impl.autocast import CudaAutocastFp16
    from parity.sides.impl import compute_dtype, half_weights, load_image_parts, sampler_settings, streamed_image_parts

    opts, label, c, dtype = run.opts, model.label, model.mmdit, compute_dtype(run)
    if run.spec.stream:  # each joint block paged in for its unit's call; weights already in the dtype they compute in
        mmdit, vae, pagers = streamed_image_parts(model, opts, dtype)
    else:
        mmdit, vae, quantized = load_image_parts(model, opts, dtype)
        mmdit = half_weights(mmdit, run, quantized)
    mmdit, vae = mmdit.to(dtype), vae.to(dtype)
    scope = CudaAutocastFp16 if opts["autocast"] else contextlib.nullcontext
    points = N.points(N.mmdit_rows(c.depth, c.qk_norm, c.dual_attention_layers), "impl")
    vrows = N.vae_rows(model.vae.ch_mult, model.vae.num_res_blocks)
    vae_units = _Units(rec, vae, {**N.vae_points(vrows, "impl", "encoder"), **N.vae_points(vrows, "impl", "decoder")},
                       model=label, component="vae")
    vget = _getter(ref, model=label, component="vae")
    with scope():
        if run.spec.image is not None:
            from parity.run import read_image

            init = read_image(run.spec.image, run.spec.height, run.spec.width)
            form = opts["form"]
            to_tensor = sampling.sai_image_to_tensor if form.img2img == "noise_scaling" else sampling.image_to_tensor
            image = to_tensor(init)
            _chain(vae_units, lambda r: vget(f"encoder.{r}"), image if opts["autocast"] else image.to(dtype),
                   vae.encoder.stages())
        for step, branches in _calls(ref, label, opts["form"]):
            units = _Units(rec, mmdit, points, [{"branch": b} for b in branches], model=label, component="mmdit",
                           step=step)
            gets = [_getter(ref, model=label, step=step, branch=b) for b in branches]

            def m(layer: str, component: str = "mmdit"):  # the batch of the call, as impl ran it
                parts = [get(layer, component=component) for get in gets]
                return None if any(p is None for p in parts) else torch.cat(parts)
            inputs = [m(f"input.{n}", "sampler") for n in ("latent_in", "timestep", "pooled", "context")]
            if any(t is None for t in inputs):
                continue
            units(mmdit.embed, *inputs)
            x, ctx, cond = m("tokens"), m("context_embedder"), m("c")
            for i, block in enumerate(mmdit.joint_blocks):
                if None in (x, ctx, cond):
                    break
                if m(f"block.{i}.x") is None:  # a block this call skipped (skip-layer guidance)
                    continue
                units(block, ctx, x, cond, mmdit.options)
                x, ctx = m(f"block.{i}.x"), m(f"block.{i}.context") if i < c.depth - 1 else ctx
            if None not in (x, cond):
                units(mmdit.final_layer, x, cond, mmdit.options.casts == "cast_back")
            final = m("final")
            if final is not None:
                units.put("output", mmdit.unpatchify(final, inputs[0].shape[2], inputs[0].shape[3]))
        calls = [(step, b) for step, bs in _calls(ref, label, opts["form"]) for b in bs]
        ss = sampler_settings(run, model)
        if run.spec.image is not None:
            ss = sampling.img2img_plan(ss, run.spec.strength)[0]  # the schedule the steps index
        last = _steps(run, model, ref, rec, ss, calls)
        if last is not None:
            z = vae.latent_out(last)
            _chain(vae_units, lambda r: vget(f"decoder.{r}"), z if opts["autocast"] else z.to(dtype),
                   vae.decoder.stages())
    pixels = vget("decoder.conv_out")
    if pixels is not None:
        to_uint8 = sampling.to_uint8 if opts["uint8"] == "round" else sampling.sai_to_uint8
        vae_units.put("image_uint8", to_uint8(pixels)[0])
    if run.spec.stream:
        run.notes.extend(p.summary(f"impl {label} {part} (teacher forcing)") for part, p in pagers.items())


def _calls(ref: R.Side, label: str, form) -> list[tuple[int, list[str]]]:
    """The MMDiT calls impl makes, per step: its CFG batch (the branches in impl's batch order; cond and uncond
    contexts of other lengths as two calls, cond first: ``cfg_lengths=split``) and the skip-layer call, where the
    reference's records have those branches."""
    have: dict[int, dict] = {}  # step -> branch -> the rows of its context
    for f, v in ref.values():
        if f["model"] == label and f["layer"] == "input.context":
            have.setdefault(f["step"], {})[f["branch"]] = v.shape[1]
    order = ["uncond", "cond"] if form.cfg_batch == "uncond_first" else ["cond", "uncond"]
    out = []
    for step in sorted(have):
        batch = [b for b in order if b in have[step]]
        if len({have[step][b] for b in batch}) > 1:
            out += [(step, [b]) for b in ("cond", "uncond")]
        else:
            out += [(step, batch)] if batch else []
        out += [(step, ["skip"])] if "skip" in have[step] else []
    return out


def _steps(run, model, ref: R.Side, rec: R.Recorder, ss, calls):
    """impl's sampler step ``i`` from the reference's latent before it and the reference's model outputs of that
    step (replayed in impl's CFG order); returns the reference's last latent."""
    import torch

    from impl import sampling

    form, label = ss.form, model.label
    steps = sorted({s for s, _ in calls})
    if not steps:
        return None
    start = steps[0]
    sig = sampling.sigmas(ss)
    get = lambda layer, step, branch=None: _getter(ref, model=label, component="sampler")(  # noqa: E731
        layer, step=step, branch=branch)
    for i in steps:
        x = get("input.latent_in", i, "cond") if i == start else get("latent", i - 1)
        if x is None:
            break
        if i == start:
            x = x.to(form.latent_dtype or ss.dtype)
        old = None
        if form.update == "dpmpp_2m" and i > start:
            prev = get(form.cfg_space, i - 1)
            before = get("input.latent_in", i - 1, "cond") if i - 1 == start else get("latent", i - 2)
            if prev is None or before is None:
                break
            old = sampling.to_x0(form.cfg_space, before, prev, sig[i - 1].to(form.timestep_dtype))
        outputs = {b: _getter(ref, model=label, component="mmdit", step=i, branch=b)("output")
                   for b in ("cond", "uncond", "skip")}
        seen: list[tuple] = []

        def replay(x_in, t, y, context, skip_layers=(), outputs=outputs, seen=seen):
            if skip_layers:
                branches = ["skip"]
            elif x_in.shape[0] == 2:
                branches = ["uncond", "cond"] if form.cfg_batch == "uncond_first" else ["cond", "uncond"]
            else:  # cond alone, or cond then uncond as two calls (cfg_lengths=split)
                branches = ["uncond"] if any(bs == ["cond"] for bs, _ in seen) else ["cond"]
            seen.append((branches, (x_in, t, context, y)))
            if any(outputs[b] is None for b in branches):
                raise _Missing
            return torch.cat([outputs[b] for b in branches])

        cond = _conditioning(ref, run.text_model.label) or _conditioning(ref, label, i, "cond")
        uncond = _conditioning(ref, label, i, "uncond") or cond
        if cond is None:
            break
        try:
            d = sampling.step(replay, x, i, start, old, cond, uncond, ss)
        except _Missing:
            d = None
        where = {"model": label, "component": "sampler", "step": i}
        for branches, inputs in seen:
            for b, branch in enumerate(branches):
                for name, t in zip(("latent_in", "timestep", "context", "pooled"), inputs):
                    if not (name == "latent_in" and i == start):  # the start latent is a source
                        rec.put(t[b: b + 1], layer=f"input.{name}", branch=branch, **where)
        if d is None:
            break
        rec.put(d[form.cfg_space], layer=form.cfg_space, **where)
        rec.put(d["latent"], layer="latent", **where)
    return get("latent", steps[-1])


class _Missing(Exception):
    """The reference has no model output for a branch impl's step calls."""


def _conditioning(ref: R.Side, label: str, step: int | None = None, branch: str | None = None):
    """A step's conditioning from the reference: its text side's context and pooled of the (first) prompt, or the
    model inputs of a branch (the negative prompt's conditioning is recorded only there)."""
    from impl import sampling

    if step is None:
        get = _getter(ref, model=label, prompt=0, component="conditioning")
        context, pooled = get("context"), get("pooled")
    else:
        get = _getter(ref, model=label, component="sampler", step=step, branch=branch)
        context, pooled = get("input.context"), get("input.pooled")
    return None if context is None or pooled is None else sampling.Conditioning(context, pooled)
