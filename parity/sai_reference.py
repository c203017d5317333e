"""The SD3.5 reference code as the reference side of the ``sai`` profile's image records.

Stability-AI/sd3.5 (``sd3_infer.py``, ``sd3_impls.py``, ``mmditx.py``, ``other_impls.py``) is not a package and not
on PyPI. The user points at a local checkout (``--sai-code DIR`` or ``SD3PARITY_SAI_CODE``); nothing of it is
copied into this project. Its own functions run the image side unchanged:

* ``sd3_impls.BaseModel`` built from the SAI single file (it infers depth, patch, qk-norm, dual layers from
  shapes) and filled by ``sd3_infer.load_into``; the VAE likewise;
* ``SD3Inferencer.get_empty_latent``, ``do_sampling`` (noise, sigmas, ``fix_cond``, ``CFGDenoiser`` /
  ``SkipLayerCFGDenoiser``, ``sample_euler`` / ``sample_dpmpp_2m``, ``process_out``), ``vae_encode`` and
  ``vae_decode`` (clamp, truncating uint8).

What the harness changes, all at the boundary, each written here:

* ``import sd3_infer`` runs ``fire.Fire(main)`` at module level: a no-op ``fire`` module is in place while it
  imports. Its ``from other_impls import ...`` needs transformers (the reference environment has it).
* dtype: ``sd3_infer`` builds the MMDiT and the VAE in float16 always; the harness builds them with the same
  ``BaseModel`` / ``load_into`` calls in the run's dtype, so a float32 run compares the code paths without half
  precision (the latent and ``fix_cond`` stay float16, as in the reference).
* VAE size: ``SDVAE()`` hard-codes the released VAE (ch 128, mult 1,2,4,4, 2 blocks). Another configuration
  (the embedded tiny VAE) gets ``sd3_impls.VAEEncoder`` / ``VAEDecoder`` of its dimensions inside an ``SDVAE``
  instance, so ``SDVAE.encode`` / ``decode`` still run.
* Without CUDA: ``.cuda()`` returns the tensor or module unchanged, and torch turns the reference's
  ``@torch.autocast("cuda", dtype=torch.float16)`` decorators off; the decorated functions (its samplers and
  ``SDVAE.encode`` / ``decode``) then run under ``impl.autocast.CudaAutocastFp16``, the same per-op dtype policy
  applied at the Python API (QUIRKS N2, V2), with CPU kernels. On a CUDA machine nothing is patched and the
  reference runs as shipped (impl on CPU then differs from it by the GPU kernels' rounding).
* Parameters get fresh, aligned storage after ``load_into`` (``determinism.own_storage``): the storage of
  ``get_tensor`` follows the tensor's offset in the file, and single-row GEMMs (the batch-1 skip-layer call)
  round differently by alignment on CPU.
* The img2img posterior noise is ``randn_like`` on the global generator, unseeded in the reference: the harness
  seeds it (``torch.manual_seed``) right before ``vae_encode``; impl gets the same draw as ``posterior_noise``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parity.determinism import own_storage

ENV = "SD3PARITY_SAI_CODE"
FILES = ("sd3_infer.py", "sd3_impls.py", "mmditx.py", "other_impls.py")
MODULES = ("sd3_infer", "sd3_impls", "mmditx", "other_impls", "dit_embedder")


def code_dir(arg: str | None) -> Path | None:
    """The checkout named by ``--sai-code`` or ``$SD3PARITY_SAI_CODE`` (None when neither is set), checked."""
    raw = arg or os.environ.get(ENV)
    if not raw:
        return None
    d = Path(raw)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        src = "--sai-code" if arg else f"${ENV}"
        raise FileNotFoundError(f"{src} {d}: not a checkout of Stability-AI/sd3.5 (missing {', '.join(missing)})")
    return d


@dataclass
class Reference:
    infer: Any  # the sd3_infer module
    impls: Any  # the sd3_impls module


@contextlib.contextmanager
def imported(d: Path):
    """Import the reference modules from ``d`` (and only from there), then restore ``sys.path``/``sys.modules``."""
    saved = {n: sys.modules.pop(n) for n in (*MODULES, "fire") if n in sys.modules}
    sys.path.insert(0, str(d))
    sys.modules["fire"] = types.SimpleNamespace(Fire=lambda *a, **k: None)  # sd3_infer ends with fire.Fire(main)
    try:
        try:
            with warnings.catch_warnings():  # its @torch.autocast("cuda") decorators warn without CUDA
                warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
                import sd3_impls
                import sd3_infer
        except ImportError as e:
            raise ValueError(f"--sai-code {d}: importing the reference failed: {e} (it needs einops, pillow, tqdm, "
                             "transformers)") from None
        for mod in (sd3_infer, sd3_impls):
            if Path(mod.__file__).resolve().parent != d.resolve():
                raise ValueError(f"--sai-code {d}: {mod.__name__} was imported from {mod.__file__}")
        yield Reference(sd3_infer, sd3_impls)
    finally:
        sys.path.remove(str(d))
        for n in (*MODULES, "fire"):
            sys.modules.pop(n, None)
        sys.modules.update(saved)


@contextlib.contextmanager
def on_this_machine():
    """No CUDA: ``.cuda()`` is the identity and the reference's ``autocast("cuda")`` warning is silenced."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def build_vae(impls, config, dtype: torch.dtype):
    """``SDVAE`` for the released dimensions; otherwise an ``SDVAE`` holding encoder/decoder of ``config``'s."""
    from impl.vae import VAEConfig

    released = VAEConfig()
    if config == released:
        return impls.SDVAE(dtype=dtype, device="cpu").eval()
    if (config.groups, config.z_channels, config.in_channels) != (released.groups, released.z_channels, released.in_channels):
        raise ValueError(f"VAE {config}: the reference's VAE classes fix 32 groups, 16 latent and 3 image channels")
    vae = impls.SDVAE.__new__(impls.SDVAE)
    torch.nn.Module.__init__(vae)
    dims = {"ch": config.ch, "ch_mult": config.ch_mult, "num_res_blocks": config.num_res_blocks}
    vae.encoder = impls.VAEEncoder(**dims, dtype=dtype, device="cpu")
    vae.decoder = impls.VAEDecoder(**dims, dtype=dtype, device="cpu")
    return vae.eval()


def load(ref: Reference, checkpoint: Path, vae_config, dtype: torch.dtype, shift: float):
    """(BaseModel, SDVAE) from the SAI single file, exactly as ``sd3_infer.SD3`` / ``VAE`` build them (but in
    ``dtype``); every parameter and buffer of both must come from the file."""
    from safetensors import safe_open

    with safe_open(checkpoint, framework="pt", device="cpu") as f:
        model = ref.impls.BaseModel(shift=shift, file=f, prefix="model.diffusion_model.", device="cpu",
                                    dtype=dtype).eval()
        vae = build_vae(ref.impls, vae_config, dtype)
        keys = set(f.keys())
        with contextlib.redirect_stdout(None):  # load_into prints the keys it skips
            ref.infer.load_into(f, model, "model.", "cpu", dtype)
            ref.infer.load_into(f, vae, "first_stage_model.", "cpu", dtype)
    for prefix, module in (("model.", model), ("first_stage_model.", vae)):
        own_storage(module)  # get_tensor's storage alignment follows the file (GEMV bits depend on it)
        unfilled = [n for n, _ in (*module.named_parameters(), *module.named_buffers())
                    if n != "model_sampling.sigmas" and prefix + n not in keys]
        if unfilled:
            raise ValueError(f"{checkpoint}: the reference's modules have parameters the file does not fill: "
                             f"{unfilled[:8]}")
    return model, vae


class Hooks:
    """What the reference computes between its own functions: every denoiser call's input latent and guided x0
    (a global forward hook filtered to its denoiser classes), the sampler's final latent (the module attribute
    ``sample_*`` wrapped, since ``do_sampling`` looks it up at call time) and the decoder's input."""

    def __init__(self, ref: Reference):
        self.ref, self.steps, self.final = ref, [], None

    @contextlib.contextmanager
    def active(self):
        impls = self.ref.impls
        kinds = tuple(getattr(impls, n) for n in ("CFGDenoiser", "SkipLayerCFGDenoiser") if hasattr(impls, n))

        def denoiser(module, args, out):
            if isinstance(module, kinds):
                self.steps.append({"latent_before": args[0].detach().clone(), "x0": out.detach().clone()})
        handle = torch.nn.modules.module.register_module_forward_hook(denoiser)
        saved = {n: getattr(impls, n) for n in ("sample_euler", "sample_dpmpp_2m")}

        def wrap(fn):
            def sampler(*a, **k):
                self.final = fn(*a, **k)
                return self.final
            return sampler
        for n, fn in saved.items():
            setattr(impls, n, wrap(fn))
        try:
            yield self
        finally:
            handle.remove()
            for n, fn in saved.items():
                setattr(impls, n, fn)

    def per_step(self) -> list[dict]:
        """x0 and the latent after each step (the next call's input; the sampler's return value for the last)."""
        after = [s["latent_before"] for s in self.steps[1:]] + [self.final]
        return [{"x0": s["x0"], "latent": a} for s, a in zip(self.steps, after)]


@contextlib.contextmanager
def cuda_autocast(ref: Reference):
    """Without CUDA, run what the reference decorates with ``@torch.autocast("cuda", dtype=torch.float16)``
    (``sample_euler``, ``sample_dpmpp_2m``, ``SDVAE.encode``, ``SDVAE.decode``) under ``impl.autocast``'s
    emulation of that policy, since torch turns the decorators off. With CUDA nothing is patched."""
    if torch.cuda.is_available():
        yield
        return
    from impl.autocast import CudaAutocastFp16

    def emulated(fn):
        @functools.wraps(fn)
        def run(*a, **k):
            with CudaAutocastFp16():
                return fn(*a, **k)
        return run
    impls = ref.impls
    saved = [(impls, n, getattr(impls, n)) for n in ("sample_euler", "sample_dpmpp_2m")]
    saved += [(impls.SDVAE, n, getattr(impls.SDVAE, n)) for n in ("encode", "decode")]
    for owner, n, fn in saved:
        setattr(owner, n, emulated(fn))
    try:
        yield
    finally:
        for owner, n, fn in saved:
            setattr(owner, n, fn)
