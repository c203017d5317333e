"""impl.autocast: CUDA autocast's float16 policy emulated at the Python API (QUIRKS N2, V2)."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from impl import autocast as A

HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
# ATen names in the header -> the Python names that reach them (None: not reachable from the Python API alone)
ALIASES = {"_convolution": None, "convolution": None, "linalg_vecdot": "vecdot", "linalg_multi_dot": "multi_dot",
           "_thnn_fused_lstm_cell": None, "_thnn_fused_gru_cell": None, "_scaled_dot_product_flash_attention": None,
           "native_layer_norm": None, "frobenius_norm": "norm", "nuclear_norm": "norm", "nll_loss2d": "nll_loss",
           "linalg_vector_norm": "vector_norm", "linalg_matrix_norm": "matrix_norm", "grid_sampler": "grid_sample"}


def _header_list(macro: str) -> set[str]:
    text = HEADER.read_text()
    body = text[text.index(f"#define {macro}(_)"):]
    body = body[: body.index("\n\n")]
    names = set()
    for name in re.findall(r"_\((?:ADD_NS\()?([a-z_0-9]+)", body):
        if name.startswith("upsample") or name.startswith("_upsample"):
            names.add("interpolate")
        else:
            alias = ALIASES.get(name, name)
            if alias is not None:
                names.add(alias)
    return names


@pytest.mark.skipif(not HEADER.is_file(), reason="this torch build ships no ATen headers")
@pytest.mark.parametrize("macro, ours", [
    ("AT_FORALL_LOWER_PRECISION_FP", A.LOWER), ("AT_FORALL_FP32", A.FP32),
    ("AT_FORALL_FP32_SET_OPT_DTYPE", A.FP32_DTYPE), ("AT_FORALL_PROMOTE", A.PROMOTE)])
def test_op_lists_are_the_installed_torch_policy(macro, ours):
    """Every op of torch's CUDA policy list is emulated, and nothing else (bar the operator spellings and the
    Python-level names of one ATen op: ``__matmul__``, ``__pow__``, ``upsample*`` -> ``interpolate``)."""
    theirs = _header_list(macro)
    assert theirs <= ours
    spellings = {"__matmul__", "__rmatmul__", "__pow__", "__rpow__", "upsample", "upsample_nearest",
                 "upsample_bilinear"}
    assert ours - theirs <= spellings


def test_float16_ops_equal_torch_autocast():
    """The ops CPU autocast also runs in float16 (its float32 list differs from CUDA's): bitwise the same."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    q, img = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    k = torch.randn(4, 3, 3, 3, generator=g)

    def ops():
        return (F.linear(x, w, b), x @ w.T, torch.bmm(x[None], w.T[None]), F.conv2d(img, k),
                F.scaled_dot_product_attention(q, q, q))
    with torch.autocast("cpu", dtype=torch.float16):
        want = ops()
    with A.CudaAutocastFp16():
        got = ops()
    assert all(a.dtype == torch.float16 and torch.equal(a, b) for a, b in zip(got, want))


def test_dtype_policy():
    h = torch.randn(2, 8).half()
    with A.CudaAutocastFp16():
        assert F.layer_norm(h, (8,)).dtype == torch.float32  # fp32 list
        assert torch.equal(h.softmax(-1), h.float().softmax(-1))  # softmax(dtype=float32)
        assert (h ** 2).dtype == h.rsqrt().dtype == h.exp().dtype == torch.float32
        assert F.interpolate(h[None, None], scale_factor=2.0).dtype == torch.float32  # upsample_nearest2d
        assert (h * 2).dtype == torch.float16 and F.silu(h).dtype == torch.float16  # not listed: input dtype
        assert torch.addcmul(h, h.float(), h).dtype == torch.float32  # promote to the widest input
        assert F.linear(h.double(), h.double()).dtype == torch.float64  # float64 is never cast
    assert F.layer_norm(h, (8,)).dtype == torch.float16  # only inside the mode
