"""``--model DIR``: impl loads a diffusers-layout directory (configs, sharded or single safetensors, tied and
legacy keys) and matches transformers on it; bad directories fail by file and key."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from impl.text import load_text_stack
from impl.weights import WeightError
from parity.flags import profile_values
from parity.run import Spec, Unsupported, check


def run_check(model, prompts, profile="diffusers", text_only=True):
    return check(Spec(model=model, prompts=tuple(prompts), profile=profile, text_only=text_only))


@pytest.fixture
def copy_dir(model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def _all_bitwise(report):
    bad = [(r["component"], r["layer"]) for r in report.records if not r["bitwise_equal"]]
    assert report.records and not bad, bad[:5]


def test_sharded_t5_and_legacy_clip_keys_load_and_match(copy_dir):
    t5 = copy_dir / "text_encoder_3"
    state = load_file(str(t5 / "model.safetensors"))
    (t5 / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(t5 / name))
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (t5 / "model.safetensors.index.json").write_text(json.dumps(index))
    clip = copy_dir / "text_encoder"
    cstate = load_file(str(clip / "model.safetensors"))
    cstate["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # what older transformers saved
    save_file(cstate, str(clip / "model.safetensors"))
    _all_bitwise(run_check(str(copy_dir), ["a photo of a cat"]))


def test_model_dir_equals_embedded_default(model_dir):
    a, b = load_text_stack(), load_text_stack(model_dir)
    for name in ("clip_l", "clip_g", "t5"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_model_without_t5_uses_diffusers_zero_rows(copy_dir):
    shutil.rmtree(copy_dir / "text_encoder_3")
    (copy_dir / "transformer").mkdir()
    (copy_dir / "transformer" / "config.json").write_text(json.dumps({"joint_attention_dim": 96}))
    report = run_check(str(copy_dir), ["a cat"])
    _all_bitwise(report)
    assert {r["component"] for r in report.records} == {"clip-l", "clip-g", "conditioning"}
    ctx = next(r for r in report.records if r["layer"] == "context")
    assert ctx["shape"] == [1, 77 + profile_values("diffusers")["t5_max_length"], 96]
    with pytest.raises(Unsupported, match="requires T5"):
        run_check(str(copy_dir), ["a cat"], "sai")


def test_model_without_t5_passes_the_full_check(model_dir, tmp_path):
    """diffusers runs such a pipeline with text_encoder_3=None and zero rows; so does impl (QUIRKS T10)."""
    from parity.embedded import model_dir as pipeline

    d = tmp_path / "no-t5"
    shutil.copytree(pipeline("sd3-medium"), d)
    shutil.rmtree(d / "text_encoder_3")
    report = run_check(str(d), ["a cat"], text_only=False)
    _all_bitwise(report)
    assert {"mmdit", "sampler", "vae"} <= {r["component"] for r in report.records}
    assert not any(r["component"] == "t5" for r in report.records)


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("sub, change, message", [
    ("text_encoder", {"hidden_size": None}, r"text_encoder/config.json: config key 'hidden_size' is missing"),
    ("text_encoder_2", {"num_hidden_layers": "4"}, r"'num_hidden_layers' is '4'; expected int"),
    ("text_encoder_2", {"hidden_act": "swish"}, r"hidden_act 'swish' is not supported"),
    ("text_encoder_3", {"feed_forward_proj": "relu"}, r"only the gated T5 v1.1"),
    ("text_encoder", {"intermediate_size": 65}, r"mis-shaped.*fc1.weight: checkpoint \(64, 32\) vs model \(65, 32\)"),
])
def test_bad_config_names_file_and_key(copy_dir, sub, change, message):
    _edit_json(copy_dir / sub / "config.json", **change)
    with pytest.raises(ValueError, match=message):
        load_text_stack(copy_dir)


def test_bad_weight_folders(copy_dir):
    t5 = copy_dir / "text_encoder_3"
    state = load_file(str(t5 / "model.safetensors"))
    state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"] + 1
    save_file(state, str(t5 / "model.safetensors"))
    with pytest.raises(WeightError, match="tied keys shared.weight and encoder.embed_tokens.weight hold different"):
        load_text_stack(copy_dir)
    (t5 / "model.safetensors").unlink()
    (t5 / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(WeightError, match=r"no model.safetensors .* it holds pytorch_model.bin, .*pickles are never read"):
        load_text_stack(copy_dir)
    (t5 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"shared.weight": "a.safetensors"}}))
    save_file({"shared.weight": state["shared.weight"], "extra": torch.zeros(1)}, str(t5 / "a.safetensors"))
    with pytest.raises(WeightError, match=r"a.safetensors: keys not listed for this shard .*: extra"):
        load_text_stack(copy_dir)


def test_tokenizer_tables_must_agree(copy_dir):
    merges = copy_dir / "tokenizer_2" / "merges.txt"
    lines = merges.read_text().split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    merges.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="tokenizer_2/merges.txt differs"):
        load_text_stack(copy_dir)
