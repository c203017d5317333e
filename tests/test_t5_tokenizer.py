"""impl T5 Unigram tokenizer against sentencepiece and transformers' T5Tokenizer."""
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from impl import embedded
from impl.t5_tokenizer import SentencePieceModel, T5Tokenizer

spm = pytest.importorskip("sentencepiece")
MODEL = SentencePieceModel.load(embedded.SPIECE)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROMPTISH = st.lists(st.sampled_from(["a", "photo", " ", "  ", "Cat", ".", "{", "~", "</s>", "<extra_id_0>", "<pad>",
                                      "ｓｕｐｅｒ", "½", "①", "ﬁ", "東京", "🐱", "\n", "\t", "e\u0301", "café"]),
                     max_size=20).map("".join)
ANY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@pytest.fixture(scope="module")
def refs(hf_tokenizers):
    return spm.SentencePieceProcessor(model_file=str(embedded.SPIECE)), hf_tokenizers[2]


@given(text=st.one_of(PROMPTISH, ANY))
@example("Hello <extra_id_0>.")
@example("{{~}} 東京 ﬁ ½")
@example("  a   b  ")
@example("</s>")
@FUZZ
def test_modes_match_references(refs, text):
    sp, hf = refs
    assert T5Tokenizer(MODEL, "sentencepiece").encode(text) == sp.encode(text)
    assert T5Tokenizer(MODEL, "hf").encode(text) == hf(text, add_special_tokens=False).input_ids


def test_diffusers_length_rule(refs):
    _, hf = refs
    tok = T5Tokenizer(MODEL, "hf")
    for text in ["a photo of a cat", " ".join(["photo"] * 300)]:
        want = hf(text, padding="max_length", max_length=256, truncation=True, add_special_tokens=True).input_ids
        assert tok.pad_to(tok.encode(text), 256).ids == want


@pytest.mark.parametrize("cut", [0, 5, 100, 1000])
def test_truncated_spiece_model_is_a_clear_error(tmp_path, cut):
    data = embedded.SPIECE.read_bytes()
    p = tmp_path / "spiece.model"
    p.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=str(p)):
        T5Tokenizer(SentencePieceModel.load(p), "hf")


def test_garbage_spiece_model(tmp_path):
    p = tmp_path / "spiece.model"
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="spiece.model"):
        SentencePieceModel.load(p)
