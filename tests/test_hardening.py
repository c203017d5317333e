"""Hostile input, faults and interruptions: each case is a reproducer of the hardening campaign (issue
"Hardening"), run through the command line in-process. Every one must end with a documented exit code and a
message naming the file, key or option at fault, never a traceback."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity.cli import main


@pytest.fixture(scope="module")
def pipeline_dir():
    from parity.embedded import model_dir

    return model_dir("sd3-medium")


@pytest.fixture
def model(pipeline_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(pipeline_dir, target, ignore=shutil.ignore_patterns("*.safetensors"))
    for p in pipeline_dir.rglob("*.safetensors"):  # links: the cases replace the files they damage
        (target / p.relative_to(pipeline_dir)).symlink_to(p)
    return target


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ---------------------------------------------------------------------------------------------- the same bytes

def test_text_encoder_under_another_name_beside_a_pickle_is_refused(model, capsys):
    te = model / "text_encoder"
    state = load_file(str(te / "model.safetensors"))
    (te / "model.safetensors").unlink()
    save_file(state, str(te / "diffusion_pytorch_model.safetensors"))
    torch.save({k: v + 1 for k, v in state.items()}, te / "pytorch_model.bin")
    code, _, err = cli(capsys, "check", "--model", model, "--text-only")
    assert code == 2 and "no model.safetensors" in err and "pytorch_model.bin" in err and str(te) in err


def test_index_beside_a_single_file_is_refused(model, capsys):
    tr = model / "transformer"
    index = {"metadata": {}, "weight_map": {k: "diffusion_pytorch_model.safetensors"
                                            for k in load_file(str(tr / "diffusion_pytorch_model.safetensors"))}}
    (tr / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = cli(capsys, "check", "--model", model, "--steps", 1)
    assert code == 2 and "holds both" in err and str(tr) in err


def test_shard_names_stay_inside_their_folder(model, capsys):
    te = model / "text_encoder_3"
    keys = load_file(str(te / "model.safetensors"))
    (te / "model.safetensors").unlink()
    (te / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../x.safetensors" for k in keys}}))
    code, _, err = cli(capsys, "check", "--model", model, "--text-only")
    assert code == 2 and "shard names must be files" in err


def test_a_pickle_beside_the_safetensors_is_never_read(model, capsys):
    """transformers would prefer the safetensors anyway; with different values in the pickle, every side still
    agrees bitwise, and the report names the one file each side read."""
    te = model / "text_encoder"
    torch.save({k: v + 1 for k, v in load_file(str(te / "model.safetensors")).items()}, te / "pytorch_model.bin")
    code, out, _ = cli(capsys, "check", "--model", model, "--text-only", "--prompt", "a cat")
    assert code == 0 and "every record bitwise equal" in out
    assert f"{te / 'model.safetensors'}  " in out and "pytorch_model.bin" not in out


# ---------------------------------------------------------------------------------------------- configs and tokenizers

def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("key,value,says", [
    ("num_attention_heads", 0, "'num_attention_heads' is 0; expected 1 to"),
    ("num_attention_heads", 3, "'num_attention_heads' (3) does not divide 'hidden_size'"),
    ("num_hidden_layers", 10 ** 9, "'num_hidden_layers' is 1000000000; expected 1 to 1024"),  # ran 371 s, bad_alloc
    ("num_hidden_layers", 4, "missing (16): text_model.encoder.layers.3"),  # within bounds: the headers disagree
    ("vocab_size", 10 ** 12, "'vocab_size' is 1000000000000"),
    ("hidden_size", True, "'hidden_size' is True; expected int"),
    ("layer_norm_eps", "1e-5", "'layer_norm_eps' is '1e-5'; expected float"),
])
def test_text_encoder_config_out_of_bounds(model, capsys, key, value, says):
    _edit_json(model / "text_encoder" / "config.json", **{key: value})
    code, _, err = cli(capsys, "check", "--model", model, "--text-only")
    assert code == 2 and says in err and str(model / "text_encoder") in err, err


def test_t5_config_out_of_bounds(model, capsys):
    _edit_json(model / "text_encoder_3" / "config.json", relative_attention_num_buckets=0)
    code, _, err = cli(capsys, "check", "--model", model, "--text-only")
    assert code == 2 and "'relative_attention_num_buckets' is 0" in err


def test_transformer_config_out_of_bounds(model, capsys):
    _edit_json(model / "transformer" / "config.json", num_layers=10 ** 9)
    code, _, err = cli(capsys, "check", "--model", model)
    assert code == 2 and "'num_layers' is 1000000000" in err and "transformer/config.json" in err


def test_vae_groups_must_divide_channels(model, capsys):
    _edit_json(model / "vae" / "config.json", norm_num_groups=7)
    code, _, err = cli(capsys, "check", "--model", model)
    assert code == 2 and "'norm_num_groups' (7) does not divide" in err and "vae/config.json" in err


def test_vocabulary_id_beyond_the_embedding_table(model, capsys):
    path = model / "tokenizer_2" / "vocab.json"
    vocab = json.loads(path.read_text())
    vocab[next(iter(vocab))] = 10 ** 7
    path.write_text(json.dumps(vocab))
    code, _, err = cli(capsys, "check", "--model", model, "--text-only")
    assert code == 2 and f"{path}: token id 10000000 is beyond the embedding table (49408 rows" in err


# ---------------------------------------------------------------------------------------------- convert

@pytest.mark.parametrize("damage,says", [("missing", "missing (1): "), ("extra", "unexpected (1): bogus.weight"),
                                         ("shape", "mis-shaped (1): ")])
def test_convert_checks_text_encoder_weights(model, tmp_path, capsys, damage, says):
    path = model / "text_encoder_2" / "model.safetensors"
    state = load_file(str(path))
    key = sorted(state)[3]
    if damage == "missing":
        state.pop(key)
    elif damage == "extra":
        state["bogus.weight"] = torch.zeros(2)
    else:
        state[key] = torch.zeros(3, 3)
    path.unlink()
    save_file(state, str(path))
    out = tmp_path / "out.safetensors"
    code, _, err = cli(capsys, "convert", model, out)
    assert code == 2 and says in err and str(model / "text_encoder_2") in err and not out.exists()
    assert not list(tmp_path.glob(".out.safetensors*"))


# ---------------------------------------------------------------------------------------------- suspect weights

def test_nan_weights_and_records_are_reported(model, capsys):
    path = model / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    state["text_model.embeddings.token_embedding.weight"][320] = float("nan")  # the id of "a"
    path.unlink()
    save_file(state, str(path))
    code, out, _ = cli(capsys, "check", "--model", model, "--text-only", "--prompt", "a cat", "--json")
    report = json.loads(out)
    assert code == 0 and report["n_nonfinite"] > 0
    assert any("embedded-default" not in w and "clip_l: 1 weights hold NaN or Inf: "
               "text_model.embeddings.token_embedding.weight (32)" in w for w in report["warnings"])
    assert any("records hold NaN or Inf, first #" in w for w in report["warnings"])
    code, out, _ = cli(capsys, "check", "--model", model, "--text-only", "--prompt", "a cat")
    assert "(NaN/Inf)" in out and "hold NaN or Inf, see the warning" in out and "\nwarning: " in out


def test_stored_dtype_casts_are_named(model, capsys):
    path = model / "text_encoder_2" / "model.safetensors"
    state = load_file(str(path))
    state = {k: v.half() if k.endswith("weight") else v for k, v in state.items()}
    n = sum(k.endswith("weight") for k in state)
    path.unlink()
    save_file(state, str(path))
    code, out, _ = cli(capsys, "check", "--model", model, "--text-only", "--prompt", "a cat")
    assert f"warning: {path}: tensors stored in another dtype than the run's float32 ({n} F16), cast on load" in out


# ---------------------------------------------------------------------------------------------- memory

def test_spilled_records_give_the_same_report(monkeypatch, capsys):
    """With a zero budget every record goes through the spill file; the report is the same, record for record."""
    argv = ["check", "--family", "sd3-medium", "--steps", "1", "--prompt", "a cat", "--json"]
    reports = []
    for budget in ("0", "100000"):
        monkeypatch.setenv("SD3PARITY_RECORD_MEMORY", budget)
        code, out, _ = cli(capsys, *argv)
        assert code == 0
        reports.append(json.loads(out)["records"])
    assert reports[0] == reports[1] and len(reports[0]) > 200


def test_spill_round_trips_every_dtype():
    from parity import records as R

    spill = R.SpillFile()
    tensors = [torch.randn(3, 5), torch.randn(2, 7).to(torch.bfloat16), torch.randn(4).half(),
               torch.arange(6).reshape(2, 3), torch.tensor(2.5), torch.zeros(0, 3), torch.tensor([True, False]),
               torch.randn(4, 6)[:, 1:3]]
    handles = [spill.put(t) for t in tensors]
    for t, h in zip(tensors, handles):
        back = h.load()
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
        if t.dim():  # rows of a spilled record are read from where they lie, not through the whole record
            for a, b in ((0, 1), (1, 2), (1, 9), (0, 0)):
                part = R.rows(h, a, b).load()
                assert part.shape == t[a:b].shape and torch.equal(part, t[a:b]), (t.shape, a, b)


def test_spilled_records_of_the_same_bytes_are_read_once(monkeypatch):
    """Two spilled records whose rows hash alike are compared without reading the reference's back: ``paired``
    gives impl's tensor twice. A differing row, dtype or shape is read and compared as before."""
    from parity import records as R
    from parity.metrics import compare

    monkeypatch.setenv("SD3PARITY_RECORD_MEMORY", "0")
    x = torch.randn(2, 3, 5)
    y = x.clone()
    y[1, 2, 4] += 1
    impl, ref = R.Recorder(), R.Recorder()
    for rec, t in ((impl, x), (ref, y)):
        batch = rec.keep(t)
        for b, branch in enumerate(("cond", "uncond")):
            rec.put(R.rows(batch, b, b + 1), component="mmdit", layer="block.0.x", step=0, branch=branch)
        rec.put(t.to(torch.bfloat16) if rec is ref else t, component="vae", layer="out")
        rec.put(t.reshape(3, 2, 5) if rec is ref else t, component="vae", layer="up")
    pairs = {f["branch"] or f["layer"]: (a, b) for f, a, b in R.paired(impl.side(), ref.side())}
    assert R.same_bytes(R.rows(impl.side()["||mmdit|block.0.x|0|cond"][1], 0, 1),
                        ref.side()["||mmdit|block.0.x|0|cond"][1])
    a, b = pairs["cond"]
    assert a is b and torch.equal(a, x[:1]) and compare(a, b)["bitwise_equal"]
    a, b = pairs["uncond"]  # the row that differs
    assert a is not b and torch.equal(b, y[1:]) and compare(a, b)["mismatched"] == 1
    for layer in ("out", "up"):  # another dtype, another shape: the same bytes do not count
        a, b = pairs[layer]
        assert a is not b and not compare(a, b)["bitwise_equal"]


def test_spilled_captures_are_the_captured_values(monkeypatch):
    """Captures past the budget go to the spill file and each CFG branch's record is its rows there (nothing read
    back and written again): the same tensors, record for record, as with every record in memory."""
    from parity import records as R
    from parity.run import Spec, execute, resolve

    spec = Spec(families=("sd3.5-medium",), steps=2, prompts=("a cat",))
    sides = []
    for budget in ("0", "100000"):
        monkeypatch.setenv("SD3PARITY_RECORD_MEMORY", budget)
        sides.append({name: execute(resolve(spec), name)[0] for name in ("impl", "diffusers")})
    spilled = 0
    for name in ("impl", "diffusers"):
        a, b = sides[0][name], sides[1][name]
        assert list(a) == list(b)
        for k in a:
            spilled += isinstance(a[k][1], R.Spilled) and a[k][0]["branch"] == "uncond"
            assert torch.equal(R.load(a[k][1]), R.load(b[k][1])), (name, k)
    assert spilled > 100  # second rows of spilled CFG batches


def test_record_memory_budget_is_checked(monkeypatch, capsys):
    monkeypatch.setenv("SD3PARITY_RECORD_MEMORY", "lots")
    code, _, err = cli(capsys, "check", "--text-only", "--prompt", "a")
    assert code == 2 and "$SD3PARITY_RECORD_MEMORY 'lots': megabytes" in err


# ---------------------------------------------------------------------------------------------- the references' files

@pytest.mark.parametrize("rel,text,says", [
    ("tokenizer/tokenizer_config.json", "[]", "tokenizer_config.json: expected a JSON object"),  # was exit 4
    ("tokenizer/special_tokens_map.json", "{x", "special_tokens_map.json: not a readable JSON config"),  # was exit 0
    ("model_index.json", "[]", "model_index.json: expected a JSON object"),  # was exit 4
])
def test_json_files_the_references_read(model, capsys, rel, text, says):
    (model / rel).write_text(text)
    code, _, err = cli(capsys, "check", "--model", model, "--steps", 1, "--prompt", "a")
    assert code == 2 and says in err and str(model / rel) in err


def test_a_missing_tokenizer_folder_is_named(model, capsys):
    shutil.rmtree(model / "tokenizer_2")
    code, _, err = cli(capsys, "check", "--model", model, "--text-only")
    assert code == 2 and f"{model / 'tokenizer_2'}: no vocab.json or merges.txt" in err


def test_tokens_refuses_a_prompt_no_tokenizer_can_take(capsys):
    code, _, err = cli(capsys, "tokens", "a\udcff")
    assert code == 2 and "unpaired surrogate U+DCFF at index 1" in err


# ---------------------------------------------------------------------------------------------- weights first

def test_a_zeroed_weight_is_a_weight_divergence_named_on_both_sides(monkeypatch, capsys):
    """impl loads a parameter wrong (here: zeroed after loading): the first divergence is that parameter, with its
    diffusers name, before any activation (it used to look exactly like a wrong op)."""
    from parity.sides import impl as side

    load = side.load_image_parts

    def zeroed(*args):
        mmdit, vae, quantized = load(*args)
        with torch.no_grad():
            mmdit.joint_blocks[1].x_block.attn.qkv.weight.zero_()
        return mmdit, vae, quantized

    monkeypatch.setattr(side, "load_image_parts", zeroed)
    code, out, _ = cli(capsys, "check", "--family", "sd3-medium", "--steps", 1, "--prompt", "a cat", "--json")
    report = json.loads(out)
    first = report["first_divergence"]
    assert code == 1 and first["layer"] == "weight:joint_blocks.1.x_block.attn.qkv.weight" and first["component"] == "mmdit"
    bad = [r for r in report["records"] if r["layer"].startswith("weight:") and not r["bitwise_equal"]]
    assert len(bad) == 1 and bad[0]["reference_name"] == ("transformer_blocks.1.attn.to_q.weight|transformer_blocks.1."
                                                          "attn.to_k.weight|transformer_blocks.1.attn.to_v.weight (split3)")
