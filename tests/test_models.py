"""Tests of models.py: the encoder itself, checkpoint reading without transformers, each bad input
as a clear error, and parity with Hugging Face transformers."""
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import Encoder, from_pretrained, read_safetensors, tiny_config
from conftest import (_batch, _hf_config_json, _hf_layout, _hf_models, _perturb, _save_ours_as_hf,
                      _small_config, _write_safetensors)


# ---------------------------------------------------------------------------------------------
# the model itself


def test_module_names_shapes_and_tiny_preset():
    model = Encoder(tiny_config(vocab_size=100, num_labels=3))
    assert (model.config.hidden, model.config.layers, model.config.heads) == (128, 2, 4)
    assert model.get_input_embeddings() is model.word_embeddings
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    block = sorted(n.split(".")[-1] for n in linears if n.startswith("layers.0."))
    assert block == sorted(["query", "key", "value", "attn_out", "ffn_in", "ffn_out"])
    assert {n for n in linears if n.startswith("head")} == {"head.dense", "head.out_proj"}
    assert model.head.out_proj.out_features == 3
    ids = torch.randint(1, 100, (2, 7))
    assert model.encode(ids).shape == (2, 7, 128)
    assert model(ids).shape == (2, 3)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_padding_does_not_change_real_tokens(model_type):
    """A sequence alone and the same sequence padded in a batch give the same hidden states
    (tests the attention mask, and RoBERTa positions skipping padding)."""
    c = _small_config(model_type)
    model = _perturb(Encoder(c)).eval()
    ids, mask, types = _batch(c)
    with torch.no_grad():
        batched = model.encode(ids, mask, types)
        alone = model.encode(ids[1:2, :4], mask[1:2, :4], types[1:2, :4])
        assert (batched[1, :4] - alone[0]).abs().max() < 1e-5
        left = torch.cat([torch.full((1, 6), c.pad_id), ids[1:2, :4]], 1)  # padding on the left
        left_mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), mask[1:2, :4]], 1)
        shifted = model.encode(left, left_mask)
        alone = model.encode(ids[1:2, :4])
        # RoBERTa numbers positions past the padding, BERT does not
        assert ((shifted[0, 6:] - alone[0]).abs().max() < 1e-5) == (model_type == "roberta")


def test_dropout_only_in_training():
    model = _perturb(Encoder(_small_config("roberta")))
    ids, mask, _ = _batch(model.config)
    torch.manual_seed(0)
    a, b = model.train()(ids, mask), model(ids, mask)
    assert not torch.allclose(a, b)
    assert torch.equal(model.eval()(ids, mask), model(ids, mask))


# ---------------------------------------------------------------------------------------------
# checkpoint reading without transformers


def test_read_safetensors_hand_written_file(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
               "b": torch.tensor([-3, 2**40], dtype=torch.int64),
               "c": torch.tensor([0.5, -2.25], dtype=torch.float16),
               "d": torch.tensor([[1.5], [-0.125]], dtype=torch.bfloat16),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    _write_safetensors(path, tensors, metadata={"format": "pt"})
    # independent check of the layout: the first 8 bytes are the header length, then JSON
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert json.loads(raw[8:8 + n])["a"]["dtype"] == "F32"
    assert np.frombuffer(raw[8 + n:8 + n + 24], "<f4").tolist() == tensors["a"].flatten().tolist()
    got = read_safetensors(path)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_hf_keys_land_in_the_right_modules(tmp_path, model_type):
    """Every tensor of a hand-made checkpoint holds its own tag; after loading, each of our parameters
    holds the tag of the Hugging Face key _HF_LAYOUT gives it (swapped LayerNorm names fail here)."""
    c = _small_config(model_type)
    layout = _hf_layout(model_type, c.layers)
    shapes = {k: v.shape for k, v in Encoder(c).state_dict().items()}
    assert sorted(layout.values()) == sorted(shapes)  # the layout covers every parameter
    tags = {theirs: float(i + 1) for i, theirs in enumerate(layout)}
    _write_safetensors(tmp_path / "model.safetensors",
                       {theirs: torch.full(shapes[ours], tags[theirs]) for theirs, ours in layout.items()})
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_json(c)))
    loaded = from_pretrained(tmp_path, num_labels=3).state_dict()
    assert {ours: loaded[ours].unique().tolist() for ours in layout.values()} == \
        {ours: [tags[theirs]] for theirs, ours in layout.items()}


@pytest.mark.parametrize("model_type, fmt", [("bert", "safetensors"), ("roberta", "bin"),
                                             ("roberta", "safetensors")])
def test_round_trip_in_hf_layout(tmp_path, model_type, fmt):
    model = _perturb(Encoder(_small_config(model_type))).eval()
    _save_ours_as_hf(model, tmp_path, fmt)
    loaded = from_pretrained(tmp_path, num_labels=3).eval()
    assert loaded.config == model.config
    ids, mask, types = _batch(model.config)
    with torch.no_grad():
        assert torch.equal(loaded.encode(ids, mask, types), model.encode(ids, mask, types))
        assert torch.equal(loaded(ids, mask, types), model(ids, mask, types))


def test_fresh_head_and_ignored_keys(tmp_path):
    """No head in the checkpoint: head is freshly initialised (std = initializer_range, zero bias);
    known-unused keys are ignored silently."""
    model = _perturb(Encoder(_small_config("roberta")))
    hf = _save_ours_as_hf(model, tmp_path, "bin")
    hf = {k: v for k, v in hf.items() if not k.startswith("classifier.")}
    hf |= {"roberta.pooler.dense.weight": torch.zeros(32, 32), "lm_head.bias": torch.zeros(40),
           "roberta.embeddings.position_ids": torch.arange(26)[None]}
    torch.save(hf, tmp_path / "pytorch_model.bin")
    cfg = json.loads((tmp_path / "config.json").read_text()) | {"initializer_range": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    loaded = from_pretrained(tmp_path, num_labels=2)
    torch.manual_seed(0)
    again = from_pretrained(tmp_path, num_labels=2)
    assert torch.equal(loaded.head.dense.weight, again.head.dense.weight)  # global RNG, seeded by caller
    assert torch.all(loaded.head.out_proj.bias == 0) and torch.all(loaded.head.dense.bias == 0)
    assert 0.4 < loaded.head.dense.weight.std() < 0.6
    assert torch.equal(loaded.layers[1].ffn_in.weight, model.layers[1].ffn_in.weight)


# ---------------------------------------------------------------------------------------------
# bad input: each a clear error


def test_missing_directory_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json"):
        from_pretrained(tmp_path / "nope", num_labels=2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path, num_labels=2)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_json(_small_config("bert"))))
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        from_pretrained(tmp_path, num_labels=2)


def test_truncated_or_damaged_safetensors(tmp_path):
    _save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "safetensors")
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8 + n // 2])  # header cut in half
    with pytest.raises(ValueError, match="truncated"):
        from_pretrained(tmp_path, num_labels=3)
    path.write_bytes(raw[:5])  # not even the length
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(path)
    path.write_bytes(raw[:-100])  # header intact, data cut
    with pytest.raises(ValueError, match="damaged"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_safetensors(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    hf = _save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "bin")
    hf["bert.encoder.layer.1.attention.self.key.weight"] = torch.zeros(32, 31)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"encoder.layer.1.attention.self.key.weight has shape \(32, 31\), "
                                         r"expected \(32, 32\)"):
        from_pretrained(tmp_path, num_labels=3)
    with pytest.raises(ValueError, match=r"classifier.weight has shape \(3, 32\), expected \(5, 32\)"):
        torch.save(_save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "bin"), tmp_path / "pytorch_model.bin")
        from_pretrained(tmp_path, num_labels=5)


def test_missing_and_unexpected_keys_in_one_message(tmp_path):
    hf = _save_ours_as_hf(Encoder(_small_config("bert")), tmp_path, "bin")
    del hf["bert.encoder.layer.0.output.dense.bias"], hf["bert.embeddings.LayerNorm.weight"]
    hf["bert.encoder.layer.2.output.dense.bias"] = torch.zeros(32)  # a third layer the config lacks
    torch.save(hf, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path, num_labels=3)
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    for key in ("encoder.layer.0.output.dense.bias", "embeddings.LayerNorm.weight", "encoder.layer.2.output.dense.bias"):
        assert key in msg


def test_unsupported_config_and_too_long_input(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2'.*supported: bert, roberta"):
        from_pretrained(tmp_path, num_labels=2)
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_json(_small_config("bert")) | {"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        from_pretrained(tmp_path, num_labels=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="config.json lacks 'vocab_size'"):
        from_pretrained(tmp_path, num_labels=2)
    model = Encoder(_small_config("roberta"))  # 26 rows, pad_id 1: 24 usable positions
    model.encode(torch.full((1, 24), 5))
    with pytest.raises(ValueError, match="length 25 exceeds.*24"):
        model.encode(torch.full((1, 25), 5))


# ---------------------------------------------------------------------------------------------
# parity with Hugging Face transformers


def _assert_encode_matches(ours, hf_model, c):
    ids, mask, types = _batch(c)
    with torch.no_grad():
        got = ours.encode(ids, mask, types)
        want = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    # compare real tokens: outputs at padding positions are unused and HF's own sdpa and eager paths differ there
    assert (got - want)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_hf_parity_base_model_safetensors(tmp_path, model_type):
    c, base, _ = _hf_models(model_type, num_labels=3)
    base.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = from_pretrained(tmp_path, num_labels=3).eval()
    _assert_encode_matches(ours, base, c)
    if model_type == "bert":  # BertModel's pooler becomes head.dense; RoBERTa's pooler is ignored
        assert torch.equal(ours.head.dense.weight, base.pooler.dense.weight)
    assert torch.all(ours.head.out_proj.bias == 0)


@pytest.mark.parametrize("model_type, num_labels", [("bert", 3), ("roberta", 3), ("roberta", 1)])
def test_hf_parity_task_model_bin(tmp_path, model_type, num_labels):
    c, _, task = _hf_models(model_type, num_labels)
    task.config.save_pretrained(tmp_path)
    torch.save(task.state_dict(), tmp_path / "pytorch_model.bin")
    assert set(task.state_dict()) == set(_hf_layout(model_type, c.layers))  # the hand-written layout is transformers'
    ours = from_pretrained(tmp_path, num_labels=num_labels).eval()
    _assert_encode_matches(ours, getattr(task, model_type), c)
    ids, mask, types = _batch(c)
    with torch.no_grad():
        got = ours(ids, mask, types)
        want = task(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert got.shape == (3, num_labels) and (got - want).abs().max() <= 1e-5
