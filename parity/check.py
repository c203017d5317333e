"""``sd3parity check``: impl and the reference text stack side by side, layer by layer."""
from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parity import flags as F
from parity import layermap as LM
from parity import records as R
from parity.determinism import pinned
from parity.metrics import compare

DEFAULT_PROMPTS = (
    "a photo of a cat",
    "wow!! amazing! so cool!!!",  # CLIP-G '!' padding (T4)
    "(masterpiece:1.2), a (red) cat, ((blue eyes))",  # weight syntax (T2)
)
COMPONENTS = (("clip-l", "text_encoder", "clip_l"), ("clip-g", "text_encoder_2", "clip_g"), ("t5", "text_encoder_3", "t5"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Report:
    model: str
    profile: str
    dtype: str
    flags: dict[str, Any]
    threads: int
    max_ulp: int
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.records if not r["ok"]]

    @property
    def first_divergence(self) -> dict | None:
        """First record, in execution order, that is not bitwise equal."""
        return next((r for r in self.records if not r["bitwise_equal"]), None)

    def to_json(self) -> dict:
        fd = self.first_divergence
        return {"model": self.model, "profile": self.profile, "dtype": self.dtype, "threads": self.threads,
                "flags": {k: v for k, v in self.flags.items()}, "tolerance": {"max_ulp": self.max_ulp},
                "records": self.records, "n_records": len(self.records), "n_failed": len(self.failures),
                "notes": self.notes,
                "first_divergence": None if fd is None else {k: fd[k] for k in fd if k in (
                    "model", "prompt", "component", "layer", "step", "branch", "block", "stream")}}


def _points(impl_model, comp: str) -> list:
    return (LM.t5_map if comp == "t5" else LM.clip_map)(impl_model.config.layers)


def _ids_hook(model, store: list):
    def pre(_m, args, kwargs):
        store.append((args[0] if args else kwargs["input_ids"]).detach().clone())
    return model.register_forward_pre_hook(pre, with_kwargs=True)


@dataclass
class TextRun:
    """What one text comparison needs, resolved from the command-line choices."""
    directory: Path
    label: str
    prompts: list[str]
    profile: str
    values: dict
    settings: Any
    dtype: torch.dtype
    joint_dim: int | None


def text_run(model_dir: str | None, prompts: list[str], profile: str, dtype: str, overrides: dict[str, Any]) -> TextRun:
    from parity import reference
    from parity.embedded import model_dir as embedded_dir

    directory = Path(model_dir) if model_dir else embedded_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"--model {directory}: not a directory")
    values = {**F.profile_values(profile), **overrides}
    joint_dim = None
    if not (directory / "text_encoder_3").is_dir():
        if profile == "sai":
            raise ValueError(f"{directory}: no text_encoder_3/; the sai profile (sd3.5 reference) requires T5")
        joint_dim = reference.joint_attention_dim(directory)
        values = {**values, "t5_absent": values["t5_absent"] or "zeros", **overrides}
    return TextRun(directory, str(model_dir or "embedded-default"), list(prompts), profile, values,
                   F.settings(values), DTYPES[dtype], joint_dim)


def text_impl_side(t: TextRun, stack) -> R.Side:
    """impl's records for every prompt: token ids, every mapped layer, context and pooled."""
    from impl.text import encode_prompt

    run_dtype = t.settings.encoder_dtype or t.dtype
    models = {comp: stack.encoder(attr, run_dtype) for comp, _, attr in COMPONENTS}
    models = {c: m for c, m in models.items() if m is not None}
    side: R.Side = {}
    for pi, prompt in enumerate(t.prompts):
        store: dict[str, list] = {}
        with contextlib.ExitStack() as es:
            for comp, model in models.items():
                es.enter_context(LM.capture(model, {f"{comp}|{p.layer}": (p.impl, "output")
                                                    for p in _points(model, comp)}, store))
            cond = encode_prompt(stack, prompt, t.settings, t.dtype, t.joint_dim)
        for comp, model in models.items():
            if comp in cond.ids:
                R.put(side, torch.tensor(cond.ids[comp]), model=t.label, prompt=pi, component=comp, layer="input_ids")
            for p in _points(model, comp):
                if store.get(f"{comp}|{p.layer}"):
                    R.put(side, store[f"{comp}|{p.layer}"][0], model=t.label, prompt=pi, component=comp, layer=p.layer)
        R.put(side, cond.context, model=t.label, prompt=pi, component="conditioning", layer="context")
        R.put(side, cond.pooled, model=t.label, prompt=pi, component="conditioning", layer="pooled")
    return side


def text_ref_side(t: TextRun, stack) -> R.Side:
    """The reference's records (diffusers' encode_prompt, or the SD3.5 procedure for the sai profile)."""
    from parity import reference

    ref_dtype = torch.float32 if t.values["encoder_dtype"] == "float32" else t.dtype
    ref = reference.load(t.directory, ref_dtype)
    run_dtype = t.settings.encoder_dtype or t.dtype
    models = {}
    for comp, ref_attr, impl_attr in COMPONENTS:
        impl_model, ref_model = stack.encoder(impl_attr, run_dtype), getattr(ref, ref_attr)
        if ref_model is None:
            continue
        skips = (LM.T5_SKIP_IMPL, LM.T5_SKIP_REF) if comp == "t5" else (LM.CLIP_SKIP_IMPL, LM.CLIP_SKIP_REF)
        points = _points(impl_model, comp)
        if comp == "t5" and "encoder.embed_tokens" not in dict(ref_model.named_modules()):
            points = LM.t5_map(impl_model.config.layers, ref_embed="shared")  # transformers 4.x
        LM.check_coverage(points, impl_model, ref_model, *skips, comp)
        models[comp] = (ref_model, points)
    side: R.Side = {}
    for pi, prompt in enumerate(t.prompts):
        store: dict[str, list] = {}
        ids = {c: [] for c in models}
        with contextlib.ExitStack() as es:
            for comp, (model, points) in models.items():
                es.enter_context(LM.capture(model, {f"{comp}|{p.layer}": (p.ref, p.ref_reads) for p in points}, store))
                es.callback(_ids_hook(model, ids[comp]).remove)
            if t.profile == "sai":
                ctx, pooled = reference.sai_encode(ref, prompt, t.dtype)
            else:
                ctx, pooled = reference.diffusers_encode(ref, prompt, t.values["t5_max_length"], t.joint_dim)
        for comp, (_, points) in models.items():
            if ids[comp]:
                R.put(side, ids[comp][0][0], model=t.label, prompt=pi, component=comp, layer="input_ids")
            for p in points:
                if store.get(f"{comp}|{p.layer}"):
                    R.put(side, store[f"{comp}|{p.layer}"][0], model=t.label, prompt=pi, component=comp, layer=p.layer)
        R.put(side, ctx, model=t.label, prompt=pi, component="conditioning", layer="context")
        R.put(side, pooled, model=t.label, prompt=pi, component="conditioning", layer="pooled")
    return side


def run_check(model_dir: str | None, prompts: list[str], profile: str, dtype: str, overrides: dict[str, Any],
              threads: int = 1, max_ulp: int = 0) -> Report:
    from impl.text import load_text_stack

    t = text_run(model_dir, prompts, profile, dtype, overrides)
    report = Report(t.label, profile, dtype, t.values, threads, max_ulp)
    with pinned(threads):
        stack = load_text_stack(model_dir)
        compare_sides(report, text_impl_side(t, stack), text_ref_side(t, stack))
    return report


def compare_sides(report: Report, impl: R.Side, ref: R.Side) -> None:
    for fields, got, want in R.paired(impl, ref):
        if got is None or want is None:  # one side did not produce it (t5_absent, a different number of calls)
            report.records.append({**fields, "shape": [], "dtype": "", "ok": False, "bitwise_equal": False,
                                   "shape_mismatch": "only the reference has it" if got is None else "only impl has it"})
        else:
            f = dict(fields)
            _add(report, f.pop("prompt") or 0, f.pop("component"), f.pop("layer"), got, want, **f)


def _add(report: Report, prompt: int, component: str, layer: str, a: torch.Tensor, b: torch.Tensor,
         **coords) -> None:
    m = compare(a, b)
    ok = m.get("bitwise_equal", False) or ("shape_mismatch" not in m and "dtype_mismatch" not in m
                                           and m["max_ulp"] <= report.max_ulp)
    report.records.append({"model": coords.pop("model", report.model), "prompt": prompt, "component": component,
                           "layer": layer, **coords, "shape": list(a.shape),
                           "dtype": str(a.dtype).removeprefix("torch."), "ok": bool(ok), **m})


def image_families(model_dir: str | None) -> list[tuple[str, Path]]:
    """(label, diffusers directory) of each pipeline to run: the three embedded families, or the named directory
    labelled by its preset (``custom`` when its dimensions match no released model)."""
    from parity.embedded import model_dir as embedded_dir

    if model_dir is None:
        from impl.embedded import MMDIT

        return [(f"embedded-{f}", embedded_dir(f)) for f in MMDIT]
    d = Path(model_dir)
    if not ((d / "transformer").is_dir() and (d / "vae").is_dir()):
        return []
    from impl.checkpoint import match_presets
    from impl.weights import read_config
    from parity.convert import config_from_diffusers

    cfg = config_from_diffusers(read_config(d / "transformer" / "config.json"), str(d / "transformer" / "config.json"))
    return [("/".join(match_presets(cfg)) or "custom", d)]


def run_image(report: Report, model_dir: str | None, values: dict, run, families: list[str] | None = None,
              checkpoint: str | None = None, sai_code: Path | None = None) -> None:
    """Append the image-side records (every step, branch, block, VAE layer, image) of each family, or of the
    SAI single-file ``checkpoint`` (impl loads it by identity; the reference gets a converted copy). The
    reference is diffusers' pipeline, or with ``sai_code`` (the sai profile) the SD3.5 reference code run on an
    SAI single file (the checkpoint, or the family's directory converted to one)."""
    import tempfile

    from impl import embedded
    from impl.mmdit import MMDiT
    from impl.text import load_text_stack
    from impl.vae import VAE
    from impl.weights import load_strict
    from parity.convert import diffusers_to_sai_file
    from parity.image_check import image_impl_side, image_ref_side, image_sai_ref_side, load_impl_image_parts

    if checkpoint is not None:
        return _run_checkpoint(report, model_dir, values, run, Path(checkpoint), sai_code)
    settings = F.settings(values)
    with pinned(report.threads), tempfile.TemporaryDirectory(prefix="sd3parity-sai-") as tmp:
        stack = load_text_stack(model_dir)
        for label, directory in image_families(model_dir):
            family = label.removeprefix("embedded-")
            if families and family not in families:
                continue
            opts = F.image_options(values)
            if model_dir is None:
                weights = {f"mmdit-{family}": embedded.mmdit_weights(family), "vae": embedded.vae_weights()}
                embedded.verify(weights)
                model = MMDiT(embedded.MMDIT[family], opts["mmdit"])
                vae = VAE(embedded.VAE, opts["vae_attention"])
                load_strict(model, weights[f"mmdit-{family}"], label)
                load_strict(vae, weights["vae"], "embedded vae")
            else:
                model, vae = load_impl_image_parts(directory, opts)
            impl = image_impl_side(label, model.eval(), vae.eval(), stack, settings,
                                   with_shift(run, values["shift"], label, directory), opts)
            r = with_shift(run, _ref_shift_rule(sai_code), label, directory)
            if sai_code is None:
                ref = image_ref_side(label, directory, model, vae, r)
            else:
                single = Path(tmp) / f"{family}.safetensors"
                with contextlib.redirect_stdout(io.StringIO()):
                    diffusers_to_sai_file(directory, single)
                ref = image_sai_ref_side(label, sai_code, single, directory, model, vae, r, _sai_sampler(opts))
            compare_sides(report, impl, ref)


def with_shift(run, rule: str, label: str, pipeline_dir: Path | None):
    """``run`` with its shift resolved for one model: ``--shift``, else ``rule`` (a ``shift`` flag value). impl
    follows the flag, each reference its own rule (diffusers: the scheduler config; the SD3.5 code: CONFIGS)."""
    return run if run.shift is not None else dataclasses.replace(run, shift=F.shift(rule, label, pipeline_dir))


def _ref_shift_rule(sai_code) -> str:
    return "scheduler_config" if sai_code is None else "sai_config"


def _sai_sampler(opts: dict) -> str:
    """The reference's ``--sampler`` for the impl sampler flag (the diffusers form has no SD3.5-code twin)."""
    update = opts["form"].update
    if not update.startswith("sai_"):
        raise ValueError(f"--flag sampler={update}: the SD3.5 reference code runs sai_euler or sai_dpmpp_2m")
    return update.removeprefix("sai_")


def _run_checkpoint(report: Report, model_dir: str | None, values: dict, run, checkpoint: Path,
                    sai_code: Path | None = None) -> None:
    import tempfile

    from impl.checkpoint import infer_mmdit_config, infer_vae_config, match_presets
    from impl.mmdit import MMDiT
    from impl.text import load_text_stack
    from impl.vae import VAE
    from impl.weights import load_strict
    from parity.convert import pipeline_from_checkpoint
    from parity.embedded import model_dir as embedded_dir
    from parity.image_check import image_impl_side, image_ref_side, image_sai_ref_side

    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    opts = F.image_options(values)
    with pinned(report.threads), tempfile.TemporaryDirectory(prefix="sd3parity-ckpt-") as tmp:
        parts = pipeline_from_checkpoint(checkpoint, Path(model_dir) if model_dir else embedded_dir(), Path(tmp))
        mc, vc = infer_mmdit_config(parts["mmdit"], str(checkpoint)), infer_vae_config(parts["vae"], str(checkpoint))
        model, vae = MMDiT(mc, opts["mmdit"]), VAE(vc, opts["vae_attention"])
        load_strict(model, parts["mmdit"], f"{checkpoint} (model.diffusion_model.*)")
        load_strict(vae, parts["vae"], f"{checkpoint} (first_stage_model.*)")
        label = "/".join(match_presets(mc)) or f"checkpoint:{checkpoint.name}"
        stack = load_text_stack(model_dir)
        if parts["text_encoders"]:  # the file's encoders on both sides; tokenizers from --model or the default
            from impl.checkpoint import load_text_encoders
            from impl.text import TextStack

            enc, _, notes = load_text_encoders(parts["text_encoders"], str(checkpoint))
            stack = TextStack(stack.vocab, stack.spiece, enc.get("clip_l", stack.clip_l), enc.get("clip_g", stack.clip_g),
                              enc.get("t5", stack.t5))
            report.notes += [f"--checkpoint text encoders: {', '.join(enc)}"] + notes
        impl = image_impl_side(label, model.eval(), vae.eval(), stack, F.settings(values),
                               with_shift(run, values["shift"], label, Path(tmp)), opts)
        run = with_shift(run, _ref_shift_rule(sai_code), label, Path(tmp))
        if sai_code is None:
            ref = image_ref_side(label, Path(tmp), model, vae, run)
        else:
            ref = image_sai_ref_side(label, sai_code, checkpoint, Path(tmp), model, vae, run, _sai_sampler(opts))
        compare_sides(report, impl, ref)


def _where(r: dict) -> str:
    """Text records: the prompt index; image records: model, step and branch."""
    if r["component"] in ("mmdit", "sampler", "vae"):
        step = "" if r.get("step") is None else f" s{r['step']}"
        return f"{r['model'].removeprefix('embedded-')}{step} {r.get('branch') or ''}".rstrip()
    return f"p{r['prompt']}"


def format_table(report: Report, prompts: list[str]) -> str:
    lines = [f"model {report.model}  profile {report.profile}  dtype {report.dtype}  threads {report.threads}  "
             f"tolerance max_ulp={report.max_ulp}", ""]
    head = f"{'where':<22} {'component':<12} {'layer':<36} {'shape':<16} {'max_abs':>10} {'ulp':>8}  bitwise"
    lines.append(head)
    lines.append("-" * len(head))
    for r in report.records:
        shape = "x".join(map(str, r["shape"]))
        mark = "yes" if r["bitwise_equal"] else ("no" if r["ok"] else "NO  <-- exceeds tolerance")
        err = r.get("shape_mismatch")
        lines.append(f"{_where(r):<22} {r['component']:<12} {r['layer']:<36} {shape:<16} "
                     + (f"{'shape ' + err:>20}" if err else f"{r['max_abs_err']:>10.3g} {r['max_ulp']:>8}") + f"  {mark}")
    lines.append("")
    lines += [f"note: {n}" for n in report.notes]
    for i, p in enumerate(prompts):
        lines.append(f"prompt {i}: {p!r}")
    fd = report.first_divergence
    lines.append("")
    lines.append(f"{len(report.records)} records, {len(report.records) - len(report.failures)} within tolerance, "
                 f"{len(report.failures)} exceed it")
    lines.append("first divergence: " + ("none (every record bitwise equal)" if fd is None else
                                         f"{_where(fd)} {fd['component']} {fd['layer']} "
                                         f"(max_abs {fd.get('max_abs_err', float('nan')):.3g}, ulp {fd.get('max_ulp', '-')}"
                                         + (f", dtype {fd['dtype_mismatch']})" if "dtype_mismatch" in fd else ")")))
    return "\n".join(lines)
