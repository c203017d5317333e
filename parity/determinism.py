"""Everything that must be pinned for bitwise-reproducible CPU runs, in one place, restored on exit."""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def pinned(threads: int = 1, deterministic: bool | None = None):
    """Fix the intra-op thread count (1 vs 2 threads changes results, e.g. oneDNN 1x1 convs), grad off, and
    (by default only when CUDA is present) ask torch for deterministic algorithms. On CPU fixed-thread float32
    results were measured bitwise identical with and without that switch (QUIRKS, determinism facts), and turning
    it on imports torch._inductor (1.6 s). The previous settings come back afterwards."""
    if deterministic is None:
        deterministic = torch.cuda.is_available()
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic != saved[1]:
        torch.use_deterministic_algorithms(deterministic)
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        if deterministic != saved[1]:
            torch.use_deterministic_algorithms(saved[1])
        torch.set_grad_enabled(saved[2])
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def own_storage(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter and buffer its own freshly allocated (64-byte aligned) storage.

    transformers 5 and diffusers keep safetensors weights as views into the memory-mapped file, so a tensor's
    alignment follows its byte offset in the file. CPU GEMM kernels pick different code paths (and round
    differently) for operands that are not 16-byte aligned: measured with transformers 5.23 / torch 2.13, adding
    one 8-byte key to a CLIP checkpoint moved ``text_projection`` off 16-byte alignment and changed its output by
    1 ulp. impl copies weights into its own parameters, so the reference is given the same footing.
    """
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.data = t.data.clone()
    return module
