"""Fuzzing the file readers and the command-line options (hypothesis): whatever the bytes or values, a reader
returns or raises its documented error naming the file (``ValueError`` and its subclasses, ``GoldenError``), and
an option is accepted or refused with a usage error; nothing else escapes. The reproducers of the hardening issue
are pinned as examples."""
import json
import math
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def _safetensors(header, payload: bytes = b"\0" * 64) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


ENTRY = st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X"]) | JSON,
                                            "shape": st.lists(st.integers(-2, 2 ** 40), max_size=3) | JSON,
                                            "data_offsets": st.lists(st.integers(-5, 2 ** 40), max_size=3) | JSON})


@given(header=st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4) | JSON,
       payload=st.binary(max_size=80))
@FUZZ
@example(header=[1], payload=b"")  # valid JSON, not an object
@example(header={"w": {"dtype": "F32", "shape": [1]}}, payload=b"\0" * 4)  # no data_offsets
@example(header={"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, payload=b"\0" * 4)
@example(header={"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, payload=b"\0" * 4)  # size mismatch
def test_safetensors_reader(tmp_path_factory, header, payload):
    from impl.weights import read_safetensors, read_safetensors_meta

    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(_safetensors(header, payload))
    for read in (read_safetensors_meta, read_safetensors):
        try:
            read(path)
        except ValueError as e:
            assert str(path) in str(e)


@given(data=st.binary(max_size=200))
@FUZZ
@example(data=b"\x80\x04\x95")  # a pickle
@example(data=b"PK\x03\x04")  # a zip
def test_safetensors_reader_on_any_bytes(tmp_path_factory, data):
    from impl.weights import read_safetensors

    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="x.safetensors"):
        read_safetensors(path)


CLIP_KEYS = ["vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
             "projection_dim", "max_position_embeddings", "layer_norm_eps", "hidden_act"]
T5_KEYS = ["vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers", "relative_attention_num_buckets",
           "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj"]
MMDIT_KEYS = ["num_layers", "num_attention_heads", "attention_head_dim", "pos_embed_max_size", "joint_attention_dim",
              "pooled_projection_dim", "qk_norm", "dual_attention_layers", "caption_projection_dim", "patch_size"]
VAE_KEYS = ["block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor",
            "use_quant_conv"]
VALUE = st.integers(-3, 2 ** 41) | st.floats() | st.booleans() | st.none() | st.text(max_size=6) | \
    st.lists(st.integers(-2, 600), max_size=5) | JSON


@pytest.mark.parametrize("kind", ["clip", "t5", "mmdit", "vae"])
@given(data=st.data())
@FUZZ
def test_config_readers(kind, data):
    from impl.clip import ClipConfig
    from impl.mmdit import MMDiTConfig
    from impl.t5 import T5Config
    from impl.vae import VAEConfig
    from impl.weights import MAX_DIM, MAX_LAYERS

    parse, keys, base = {
        "clip": (ClipConfig.from_hf, CLIP_KEYS, dict(vocab_size=49408, hidden_size=32, num_attention_heads=2,
                                                     num_hidden_layers=2, intermediate_size=64, projection_dim=32)),
        "t5": (T5Config.from_hf, T5_KEYS, dict(vocab_size=320, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                               feed_forward_proj="gated-gelu")),
        "mmdit": (MMDiTConfig.from_diffusers, MMDIT_KEYS, dict(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                                               pos_embed_max_size=16, joint_attention_dim=64,
                                                               pooled_projection_dim=64)),
        "vae": (VAEConfig.from_diffusers, VAE_KEYS, dict(block_out_channels=[32, 64]))}[kind]
    cfg = dict(base)
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        cfg[k] = data.draw(VALUE)
    try:
        c = parse(cfg, "config.json")
    except ValueError as e:
        assert "config.json" in str(e) or "MMDiT width" in str(e)
        return
    sizes = [v for v in vars(c).values() if isinstance(v, int) and not isinstance(v, bool)]
    assert all(0 <= v <= max(MAX_DIM, MAX_LAYERS, 1 << 20) for v in sizes)
    assert all(math.isfinite(v) for v in vars(c).values() if isinstance(v, float))


@given(vocab=JSON | st.dictionaries(st.text(max_size=4), st.integers(-3, 10 ** 12) | JSON, max_size=6),
       merges=st.text(max_size=60))
@FUZZ
@example(vocab={"a": True}, merges="")
@example(vocab={"a": -1}, merges="")
def test_clip_vocabulary_reader(tmp_path_factory, vocab, merges):
    from impl.clip_tokenizer import BPEVocab

    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text(merges)
    try:
        v = BPEVocab.from_dir(d)
    except ValueError as e:
        assert str(d) in str(e)
        return
    assert all(type(i) is int and i >= 0 for i in v.encoder.values())


@given(data=st.binary(max_size=120))
@FUZZ
@example(data=b"\x0a\x03\x0a\x01a\x1a\x02\x10\x05")  # a piece, then a normalizer spec whose charsmap is a varint
def test_sentencepiece_reader(tmp_path_factory, data):
    from impl.t5_tokenizer import SentencePieceModel, T5Tokenizer

    path = tmp_path_factory.mktemp("sp") / "spiece.model"
    path.write_bytes(data)
    try:
        model = SentencePieceModel.load(path)
        T5Tokenizer(model).encode("a photo of a cat")
    except ValueError as e:
        assert str(path) in str(e)


@pytest.fixture(scope="module")
def manifest():
    from pathlib import Path

    return json.loads((Path(__file__).parent.parent / "golden" / "embedded-diffusers-float32" / "manifest.json").read_text())


FIELDS = ["schema_version", "settings", "environment", "versions", "records", "tensor_file", "tensor_file_sha256",
          "records_sha256", "flags", "reference", "schema"]


@given(data=st.data())
@settings(FUZZ, max_examples=100)
def test_golden_manifest_checks(manifest, data):
    """Any field replaced by any JSON value, or a record's field edited: a GoldenError (exit 23/24), never another
    exception; with the records checksum recomputed, the record-level checks still refuse what is malformed."""
    import copy

    from parity import golden as G

    m = copy.deepcopy(manifest)
    if data.draw(st.booleans()):
        m[data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
    else:
        i = data.draw(st.integers(0, len(m["records"]) - 1))
        m["records"][i][data.draw(st.sampled_from(["key", "sha256", "storage", "shape", "dtype", "seq", "source"]))] = \
            data.draw(JSON)
        if data.draw(st.booleans()):
            m["records_sha256"] = G.records_sha256(m["records"])
    try:
        G.check_manifest(m, G.Path("manifest.json"))
        G.spec_of(m["settings"], "manifest.json")
    except G.GoldenError as e:
        assert e.code in (23, 24)


OPTIONS = {"--threads": st.integers(-5, 5000).map(str), "--steps": st.integers(-5, 5000).map(str),
           "--guidance": st.sampled_from(["nan", "inf", "-inf", "-1", "0", "4.5", "1e308", "x"]),
           "--shift": st.sampled_from(["nan", "inf", "0", "-1", "3", "1e-300", "x"]),
           "--seed": st.sampled_from(["-1", "0", str(2 ** 63), str(2 ** 63 - 1), "1.5"]),
           "--size": st.sampled_from(["64x64", "0x64", "65x64", "64", "x", "-64x64", "1600000x16"]),
           "--slg": st.integers(-3, 100).map(str), "--strength": st.sampled_from(["0", "1", "1.5", "nan", "-0.1"]),
           "--max-ulp": st.integers(-3, 10).map(str), "--dtype": st.sampled_from(["float32", "float64", "int8"]),
           "--profile": st.sampled_from(["diffusers", "sai", "comfy"]),
           "--flag": st.sampled_from(["shift=scheduler_config", "nope=1", "shift", "clip_pool=first_eos", "=x"])}


@given(options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), max_size=4), data=st.data())
@FUZZ
@example(options={"--threads": None}, data=None)
def test_check_options(options, data):
    """Every option combination is accepted by validation or refused as a usage error (argparse: SystemExit 2)."""
    from parity.cli import parser, spec_from
    from parity.run import UsageError

    argv = ["check"]
    for k in options:
        argv += [k, data.draw(OPTIONS[k]) if data is not None else "0"]
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    try:
        s = spec_from(args)
    except (UsageError, ValueError):
        return
    assert 1 <= s.threads <= 1024 and 1 <= s.steps <= 1000 and math.isfinite(s.guidance) and s.guidance >= 0
    assert s.shift is None or (math.isfinite(s.shift) and s.shift > 0) and 0 <= s.seed < 2 ** 63


@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=300))
@settings(max_examples=60, deadline=None)
@example(text="a\u0310\u1abf")
@example(text="x" * 5000)
def test_tokenizers_never_crash(text):
    from parity.tokens import tokens_report

    report = tokens_report(text, None)
    assert report["prompt"] == text
