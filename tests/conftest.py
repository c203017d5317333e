import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

# the embedded model directory is built once per test session in a private cache
os.environ.setdefault("SD3PARITY_CACHE", str(Path(tempfile.gettempdir()) / "sd3parity-test-cache"))


@pytest.fixture(scope="session")
def model_dir():
    from parity.embedded import model_dir as build

    return build()


@pytest.fixture(scope="session")
def stack():
    from impl.text import load_text_stack

    return load_text_stack()


@pytest.fixture(scope="session")
def openai_tokenizer():
    """OpenAI's own SimpleTokenizer from the clip-anytorch package files (importing the package pulls torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-anytorch is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    s = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.SimpleTokenizer()


ROOT = Path(__file__).resolve().parent.parent
# the SD3.5 code: $SD3PARITY_SAI_CODE, else the verbatim checkout beside the repository (../shared/references/sd3.5)
SAI_CODE = os.environ.get("SD3PARITY_SAI_CODE") or str(ROOT.parent / "shared" / "references" / "sd3.5")
needs_sai = pytest.mark.skipif(not (Path(SAI_CODE) / "sd3_infer.py").is_file(),
                               reason=f"no SD3.5 code at {SAI_CODE} (set SD3PARITY_SAI_CODE)")


@pytest.fixture(scope="session")
def ref_cache():
    """Reference sides computed once per session and compared with many impl variants (``run.execute``)."""
    return {}


@pytest.fixture(scope="session")
def hf_tokenizers(model_dir):
    """transformers' own tokenizers of the embedded default: CLIP-L, CLIP-G, T5."""
    from transformers import CLIPTokenizer, T5Tokenizer

    return (CLIPTokenizer.from_pretrained(model_dir / "tokenizer"), CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2"),
            T5Tokenizer.from_pretrained(model_dir / "tokenizer_3"))


def sai_form():
    """impl's sampler form under the sai profile (the SD3.5 code's values, as parity.flags maps them)."""
    from parity import flags as F

    return F.image_options(F.profile_values("sai"))["form"]
