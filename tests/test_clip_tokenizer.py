"""impl CLIP tokenizer modes against the real tokenizers, with pinned examples for each divergence class."""
import gzip

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from impl import embedded
from impl.clip_tokenizer import BPEVocab, ClipTokenizer

transformers = pytest.importorskip("transformers")

VOCAB = BPEVocab.from_openai_gz(embedded.BPE_GZ)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROMPTISH = st.lists(st.sampled_from(["a", "photo", "of", "Cat", "!!", "!", "(red:1.2)", "((x))", "don't", "12", "34",
                                      "é", "e\u0301", "&amp;", "it’s", "！", "ΟΔΟΣ", "東京", "🐱", "\n", "\t", " ",
                                      "<|endoftext|>", "\\(", "naïve", "ﬁ"]), max_size=20).map("".join)
ANY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)

# one pinned example per divergence class of TOKENIZERS.md (the reference decides what the ids are)
CLASSES = ["！", "it’s", "salt &amp; pepper", "ΟΔΟΣ", "\u0345", "<|endoftext|>", "<|ENDOFTEXT|>", "! !! !!!", "\xad",
           "A㐀", "cafÃ©", "a (red:1.5) cat", "wow!! amazing! so cool!!!", "", "   "]


@pytest.fixture(scope="module")
def hf(hf_tokenizers):
    return hf_tokenizers


def test_vocab_files_equal_openai_table(model_dir):
    files = BPEVocab.from_files(model_dir / "tokenizer" / "vocab.json", model_dir / "tokenizer" / "merges.txt")
    assert files.encoder == VOCAB.encoder and files.ranks == VOCAB.ranks and len(VOCAB.encoder) == 49408


@pytest.mark.parametrize("text", CLASSES)
def test_openai_mode_pinned(openai_tokenizer, text):
    assert ClipTokenizer(VOCAB, "openai").encode(text) == openai_tokenizer.encode(text)


@given(text=st.one_of(PROMPTISH, ANY))
@FUZZ
def test_openai_mode_fuzz(openai_tokenizer, text):
    assert ClipTokenizer(VOCAB, "openai").encode(text) == openai_tokenizer.encode(text)


@pytest.mark.parametrize("text", CLASSES)
@pytest.mark.parametrize("mode,which", [("hf", 0), ("hf-bang-pad", 1)])
def test_hf_modes_pinned(hf, mode, which, text):
    assert ClipTokenizer(VOCAB, mode).encode(text) == hf[which](text, add_special_tokens=False).input_ids


@given(text=st.one_of(PROMPTISH, ANY))
@example("'!! ab")
@example("\u1c89\u1c8a\U000323b0\u0558")  # assigned after Unicode 14: impl reads the recorded delta table
@FUZZ
def test_hf_modes_fuzz(hf, text):
    assert ClipTokenizer(VOCAB, "hf").encode(text) == hf[0](text, add_special_tokens=False).input_ids
    assert ClipTokenizer(VOCAB, "hf-bang-pad").encode(text) == hf[1](text, add_special_tokens=False).input_ids


def test_every_code_point_past_unicode_14(hf):
    """Each code point the delta table covers, in letter, number and punctuation context, as the Rust tokenizer.
    Without the table 17,171 of them differ (Oniguruma's letter class is older than the regex module's, Rust's
    lower-casing newer than Python 3.11's: U+1C89 lower-cases to U+1C8A)."""
    import json

    from impl.clip_tokenizer import UNICODE_DELTA

    d = json.loads(UNICODE_DELTA.read_text())
    cps = {c for key in ("letter", "number", "space") for a, b in d[key] for c in range(a, b + 1)}
    cps |= {int(k, 16) for k in d["normalize"]} | {0x0558, 0x10940, 0x323B0, 0xE0080, 0x10FFFD}  # some 'other' ones
    texts = [f"a{chr(c)}b {chr(c)}1 !{chr(c)}{chr(c).upper()}" for c in sorted(cps)]
    want = hf[0](texts, add_special_tokens=False).input_ids
    tok = ClipTokenizer(VOCAB, "hf")
    bad = [hex(c) for c, t, w in zip(sorted(cps), texts, want) if tok.encode(t) != w]
    assert len(cps) > 9000 and not bad, bad[:20]


def test_every_assigned_code_point_in_letter_and_combining_contexts(hf):
    """Each code point assigned in Unicode 14 after a letter and before marks, and after marks, as the Rust tokenizer:
    its NFC orders 98 marks of Unicode 10-14 as class 0 (reproduced from ``nfc_starters`` in the delta table).
    Issue reproducer: U+0310 U+1ABF after 'a' (Python's NFC swaps them, the Rust one does not)."""
    import unicodedata

    tok = ClipTokenizer(VOCAB, "hf")
    assert tok.encode("a\u0310\u1abf") == [320, 136, 238, 157, 103, 379] == hf[0]("a\u0310\u1abf", add_special_tokens=False).input_ids
    cps = [c for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    words = [f"a{chr(c)}\u0310\u1abf \u1abf{chr(c)}\u0301e\u0301\u302a{chr(c)}" for c in cps]
    bad = []
    for i in range(0, len(words), 20000):
        text = " ".join(words[i:i + 20000])
        if tok.encode(text) != hf[0](text, add_special_tokens=False).input_ids:
            bad += [hex(c) for c, w in zip(cps[i:i + 20000], words[i:i + 20000])
                    if tok.encode(w) != hf[0](w, add_special_tokens=False).input_ids]
    assert len(cps) > 140_000 and not bad, bad[:20]


@pytest.mark.parametrize("which,pad", [(0, 49407), (1, 0)])
def test_full_layout_matches_diffusers_call(hf, which, pad):
    """diffusers: padding='max_length', max_length=77, truncation=True (75 content + forced EOS)."""
    mode = "hf" if which == 0 else "hf-bang-pad"
    for text in ["a photo", " ".join(["cat"] * 90), "wow!!"]:
        want = hf[which](text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ClipTokenizer(VOCAB, mode, pad)(text).ids == want


def test_bang_pad_example_from_quirks():
    """QUIRKS.md T4: SAI ids vs diffusers CLIP-G ids for the same prompt."""
    text = "wow!! amazing! so cool!!!"
    assert ClipTokenizer(VOCAB, "hf").encode(text) == [2781, 748, 1370, 256, 706, 2077, 995]
    assert ClipTokenizer(VOCAB, "hf-bang-pad").encode(text) == [2781, 0, 0, 1370, 0, 706, 2077, 0, 0, 0]


@pytest.mark.parametrize("content,err", [
    (b"not gzip", "not a readable gzip"),
    (gzip.compress(b"header\nh e\n"), "expected 48894 merges"),
    (gzip.compress(b"header\nh e x\n" + b"a b\n" * 48893), ":2: expected two"),
])
def test_malformed_bpe_table(tmp_path, content, err):
    p = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=err):
        BPEVocab.from_openai_gz(p)


def test_malformed_vocab_and_merges(tmp_path, model_dir):
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="vocab.json: not a readable JSON"):
        BPEVocab.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}')
    with pytest.raises(ValueError, match=r"merges.txt:2: merge result 'ab' is not in vocab.json"):
        BPEVocab.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_unpaired_surrogate_is_a_clear_error():
    with pytest.raises(ValueError, match="unpaired surrogate U\\+D800 at index 1"):
        ClipTokenizer(VOCAB, "hf").encode("a\ud800")


# --- transformers 4.x (tox env tf4; .ci/run runs these in a second environment) -----------------------------

@pytest.fixture(scope="module")
def tf4(model_dir):
    """transformers 4.x: the slow CLIPTokenizer with ftfy hidden (its BasicTokenizer fallback) and the fast one."""
    if int(transformers.__version__.split(".")[0]) != 4:
        pytest.skip(f"needs transformers 4.x (have {transformers.__version__}); run by the tox env tf4")
    import sys

    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = None  # makes `import ftfy` fail inside CLIPTokenizer.__init__
    try:
        slow = transformers.CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    finally:
        if saved is None:
            sys.modules.pop("ftfy")
        else:
            sys.modules["ftfy"] = saved
    assert slow.fix_text is None, "ftfy was used; the hf-slow-noftfy reference is the BasicTokenizer fallback"
    return slow, transformers.CLIPTokenizerFast.from_pretrained(model_dir / "tokenizer")


SLOW_CLASSES = CLASSES + ["東京タワー", "a\x00b\x7fc", "tab\there", "e\u0301", "ﬁne", "don't STOP", "x<|endoftext|>y",
                          "<|startoftext|>"]


@pytest.mark.tf4
@pytest.mark.parametrize("text", SLOW_CLASSES)
def test_tf4_pinned(tf4, text):
    assert ClipTokenizer(VOCAB, "hf-slow-noftfy").encode(text) == tf4[0](text, add_special_tokens=False).input_ids
    assert ClipTokenizer(VOCAB, "hf").encode(text) == tf4[1](text, add_special_tokens=False).input_ids


@pytest.mark.tf4
@given(text=st.one_of(PROMPTISH, ANY))
@FUZZ
def test_tf4_fuzz(tf4, text):
    assert ClipTokenizer(VOCAB, "hf-slow-noftfy").encode(text) == tf4[0](text, add_special_tokens=False).input_ids
    assert ClipTokenizer(VOCAB, "hf").encode(text) == tf4[1](text, add_special_tokens=False).input_ids


@pytest.mark.tf4
def test_tf4_full_layout(tf4):
    for text in ["a photo", " ".join(["cat"] * 90), "東京"]:
        want = tf4[0](text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ClipTokenizer(VOCAB, "hf-slow-noftfy", 49407)(text).ids == want


@pytest.mark.tf4
def test_tf4_text_stack_bitwise_with_eager_t5(tf4, capsys):
    """Under transformers 4.57.6 (with diffusers 0.39.0) every text record is bitwise equal once impl runs T5
    attention the 4.x way (flag t5_attention=eager); with the 5.x default the first divergence is T5's block 0."""
    pytest.importorskip("diffusers")
    import json

    from parity.cli import main

    assert main(["check", "--text-only", "--json", "--flag", "t5_attention=eager"]) == 0
    assert json.loads(capsys.readouterr().out)["first_divergence"] is None
    assert main(["check", "--text-only", "--json", "--prompt", "a cat"]) == 1
    fd = json.loads(capsys.readouterr().out)["first_divergence"]
    assert (fd["component"], fd["layer"]) == ("t5", "block.0.layer.0.SelfAttention.o")


def _merge_rescanning(parts, ranks):
    """The textbook loop (rescans the word per merge): the oracle of the fast one."""
    while len(parts) > 1:
        pairs = [p for p in zip(parts, parts[1:]) if p in ranks]
        if not pairs:
            return parts
        best, merged, i = min(pairs, key=ranks.get), [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


@given(word=st.text("abcde", min_size=1, max_size=60),
       table=st.lists(st.tuples(st.text("abcde", min_size=1, max_size=3), st.text("abcde", min_size=1, max_size=3)),
                      max_size=40, unique=True))
@settings(max_examples=400, deadline=None)
@example(word="aaaaa", table=[("a", "a"), ("aa", "a")])
@example(word="xyxy", table=[("x", "y"), ("xy", "x")])
def test_fast_bpe_merges_as_the_rescanning_loop(word, table):
    """Any rank table, consistent or not (a merge may come before its parts exist), and the real one."""
    from impl.clip_tokenizer import merge_lowest_first

    ranks = {pair: r for r, pair in enumerate(table)}
    assert merge_lowest_first(list(word), ranks) == _merge_rescanning(list(word), ranks)
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    assert merge_lowest_first(list(parts), VOCAB.ranks) == _merge_rescanning(list(parts), VOCAB.ranks)
