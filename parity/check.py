"""``sd3parity check``: impl and the reference text stack side by side, layer by layer."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parity import flags as F
from parity import layermap as LM
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


def _maps(stack, ref, run_dtype: torch.dtype) -> dict[str, tuple[list, Any, Any]]:
    out = {}
    for comp, ref_attr, impl_attr in COMPONENTS:
        impl_model, ref_model = stack.encoder(impl_attr, run_dtype), getattr(ref, ref_attr)
        if impl_model is None and ref_model is None:  # a model without T5
            continue
        if comp == "t5":
            points = LM.t5_map(impl_model.config.layers)
            LM.check_coverage(points, impl_model, ref_model, LM.T5_SKIP_IMPL, LM.T5_SKIP_REF, comp)
        else:
            points = LM.clip_map(impl_model.config.layers)
            LM.check_coverage(points, impl_model, ref_model, LM.CLIP_SKIP_IMPL, LM.CLIP_SKIP_REF, comp)
        out[comp] = (points, impl_model, ref_model)
    return out


def _ids_hook(model, store: list):
    def pre(_m, args, kwargs):
        store.append((args[0] if args else kwargs["input_ids"]).detach().clone())
    return model.register_forward_pre_hook(pre, with_kwargs=True)


def run_check(model_dir: str | None, prompts: list[str], profile: str, dtype: str, overrides: dict[str, Any],
              threads: int = 1, max_ulp: int = 0) -> Report:
    from impl.text import encode_prompt, load_text_stack
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
    settings = F.settings(values)
    torch_dtype = DTYPES[dtype]
    report = Report(str(model_dir or "embedded-default"), profile, dtype, values, threads, max_ulp)
    with pinned(threads):
        stack = load_text_stack(model_dir)
        ref_dtype = torch.float32 if values["encoder_dtype"] == "float32" else torch_dtype
        ref = reference.load(directory, ref_dtype)
        maps = _maps(stack, ref, settings.encoder_dtype or torch_dtype)
        impl_store: dict[str, list] = {}
        ref_store: dict[str, list] = {}
        ids_store: dict[str, list] = {c: [] for c in maps}
        outputs = []
        handles = [_ids_hook(maps[c][2], ids_store[c]) for c in maps]
        try:
            for prompt in prompts:
                with contextlib.ExitStack() as es:
                    for comp, (points, impl_model, ref_model) in maps.items():
                        es.enter_context(LM.capture(impl_model, {f"{comp}|{p.layer}": (p.impl, "output") for p in points}, impl_store))
                        es.enter_context(LM.capture(ref_model, {f"{comp}|{p.layer}": (p.ref, p.ref_reads) for p in points}, ref_store))
                    cond = encode_prompt(stack, prompt, settings, torch_dtype, joint_dim)
                    if profile == "sai":
                        ref_ctx, ref_pooled = reference.sai_encode(ref, prompt, torch_dtype)
                    else:
                        ref_ctx, ref_pooled = reference.diffusers_encode(ref, prompt, values["t5_max_length"], joint_dim)
                outputs.append((cond, ref_ctx, ref_pooled))
        finally:
            for h in handles:
                h.remove()
    for pi, (cond, ref_ctx, ref_pooled) in enumerate(outputs):
        for comp, (points, _, _) in maps.items():
            ref_ids = ids_store[comp][pi][0] if pi < len(ids_store[comp]) else torch.tensor([])
            impl_ids = torch.tensor(cond.ids.get(comp, []))
            _add(report, pi, comp, "input_ids", impl_ids, ref_ids)
            for p in points:
                key = f"{comp}|{p.layer}"
                got, want = impl_store.get(key, []), ref_store.get(key, [])
                if pi < len(got) and pi < len(want):
                    _add(report, pi, comp, p.layer, got[pi], want[pi])
                elif pi < len(got) or pi < len(want):  # one side did not run this encoder (t5_absent)
                    report.records.append({"prompt": pi, "component": comp, "layer": p.layer, "shape": [],
                                           "dtype": "", "ok": False, "bitwise_equal": False,
                                           "shape_mismatch": "impl ran" if got else "reference ran"})
        _add(report, pi, "conditioning", "context", cond.context, ref_ctx)
        _add(report, pi, "conditioning", "pooled", cond.pooled, ref_pooled)
    return report


def _add(report: Report, prompt: int, component: str, layer: str, a: torch.Tensor, b: torch.Tensor,
         **coords) -> None:
    m = compare(a, b)
    ok = m.get("bitwise_equal", False) or ("shape_mismatch" not in m and m["max_ulp"] <= report.max_ulp)
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
              checkpoint: str | None = None) -> None:
    """Append the image-side records (every step, branch, block, VAE layer, image) of each family, or of the
    SAI single-file ``checkpoint`` (impl loads it by identity; the reference gets a converted copy)."""
    if checkpoint is not None:
        return _run_checkpoint(report, model_dir, values, run, Path(checkpoint))
    from impl import embedded
    from impl.mmdit import MMDiT
    from impl.text import load_text_stack
    from impl.vae import VAE
    from impl.weights import load_strict
    from parity.image_check import load_impl_image_parts, run_image_check

    settings = F.settings(values)
    with pinned(report.threads):
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
            run_image_check(label, directory, model.eval(), vae.eval(), stack, settings, run, opts,
                            lambda f, a, b: _add(report, 0, f.pop("component"), f.pop("layer"), a, b, **f))


def _run_checkpoint(report: Report, model_dir: str | None, values: dict, run, checkpoint: Path) -> None:
    import tempfile

    from impl.checkpoint import infer_mmdit_config, infer_vae_config, match_presets
    from impl.mmdit import MMDiT
    from impl.text import load_text_stack
    from impl.vae import VAE
    from impl.weights import load_strict
    from parity.convert import pipeline_from_checkpoint
    from parity.embedded import model_dir as embedded_dir
    from parity.image_check import run_image_check

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
        run_image_check(label, Path(tmp), model.eval(), vae.eval(), stack, F.settings(values), run,
                        opts, lambda f, a, b: _add(report, 0, f.pop("component"), f.pop("layer"), a, b, **f))


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
                                         f"(max_abs {fd.get('max_abs_err', float('nan')):.3g}, ulp {fd.get('max_ulp', '-')})"))
    return "\n".join(lines)
