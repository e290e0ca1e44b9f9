"""cglora on tiny random Hugging Face models (transformers, and peft where named; skipped when absent):
each family's collected G against autograd's gradient of the model's own loss."""
import json
import warnings

import pytest
import torch
from torch import nn

import cglora
import data
import train
from cglora import add_lora
from models import from_pretrained, load_adapter
from conftest import _batch, _hf_models, _train

transformers = pytest.importorskip("transformers")
# The GLUE fixtures hold a few rows, not GLUE's counts: read_split's RowCountWarning is expected
# (pytest.warns still sees it where a test checks it).
pytestmark = pytest.mark.filterwarnings("ignore::data.RowCountWarning")


def _padded(seed, shape, vocab, lengths, pad=0):  # ids [b, L] and the mask of the first lengths[i] tokens
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, shape, generator=g)
    mask = (torch.arange(shape[1]) < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


def _assert_G_is_autograd(model, targets, batch, loss=None, reference=lambda out: out.loss):
    """collect_statistics' G of every nn.Linear whose last name is in targets against autograd's gradient
    of reference(model(**batch)), the model's own loss on the same batch (labels included)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    assert layers
    stats = cglora.collect_statistics(model, layers, [batch], loss=loss, folds=1)
    grads = torch.autograd.grad(reference(model.eval()(**batch)), [m.weight for m in layers.values()])
    for (name, _), grad in zip(layers.items(), grads):
        assert grad.norm() > 0, name
        assert (stats[name].G - grad).norm() <= 1e-5 * grad.norm(), name
    return layers, stats


def _albert():
    config = transformers.AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.AlbertForSequenceClassification(config)


def test_albert_shared_layers_sum_their_calls_and_equal_autograd():
    """ALBERT runs one layer at every depth: G sums the gradients of its 3 calls, S their padded token rows."""
    ids, mask = _padded(0, (3, 7), 50, (7, 4, 5))
    batch = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    layers, stats = _assert_G_is_autograd(_albert(), ["query", "value", "dense", "ffn"], batch)
    assert len(layers) == 4


def _t5():
    config = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]  # encoder, decoder self- and cross-attention, feed-forward


def _call_inputs(model, module, batch):  # the inputs of every call of `module` in model(**batch)
    xs = []
    handle = module.register_forward_hook(lambda m, inputs, output: xs.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            model.eval()(**batch)
    finally:
        handle.remove()
    return xs


@pytest.mark.parametrize("decoder_length, given", [(5, False), (7, False), (7, True)])
def test_t5_padded_encoder_and_labels_equal_autograd(decoder_length, given):
    """Encoder masked by attention_mask; the decoder's own tokens by decoder_attention_mask, or when
    none is given by the labels other than -100 (also at the encoder's length, where its mask would
    fit); cross-attention's keys and values by the encoder's; the labels go to the model, which
    builds the decoder inputs (seq2seq_lm_loss)."""
    ids, mask = _padded(1, (3, 7), 50, (7, 3, 5))
    labels, decoder_mask = _padded(2, (3, decoder_length), 50, (decoder_length, 2, 4))
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(decoder_mask == 0, -100))
    if given:
        batch["decoder_attention_mask"] = decoder_mask
    model = _t5()
    layers, stats = _assert_G_is_autograd(model, T5_TARGETS, batch, loss=cglora.seq2seq_lm_loss)
    assert len(layers) == 2 * 6 + 2 * 10
    cross_k = stats["decoder.block.0.layer.1.EncDecAttention.k"]  # S over the encoder's 15 real tokens
    x = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.detach()[mask.bool()]
    torch.testing.assert_close(cross_k.S, x.T @ x / 15, atol=1e-6, rtol=1e-5)
    name = "decoder.block.0.layer.0.SelfAttention.q"  # S over the decoder's real target tokens
    x = _call_inputs(model, layers[name], batch)[0][decoder_mask.bool()]
    assert stats[name].tokens == decoder_mask.sum() == x.shape[0]
    torch.testing.assert_close(stats[name].S, x.T @ x / x.shape[0], atol=1e-6, rtol=1e-5)
    sampled = cglora.collect_statistics(model, layers, [batch], loss=cglora.seq2seq_lm_loss, folds=1,
                                        fisher="sampled")  # T from the model's tokens, G from the labels
    for name in layers:
        torch.testing.assert_close(sampled[name].G, stats[name].G)
        assert not torch.allclose(sampled[name].T, stats[name].T)


def test_t5_inside_a_wrapper_of_the_callers_has_the_statistics_of_t5_itself():
    """The encoder is found inside a module without a config, so the decoder's S keeps its own
    tokens' rows (it took the encoder's mask, 24-40% off, when only the model itself was asked)."""
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):
            return self.inner(**batch)

    ids, mask = _padded(1, (3, 7), 50, (7, 3, 5))
    labels, decoder_mask = _padded(2, (3, 7), 50, (7, 2, 4))
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(decoder_mask == 0, -100))
    model = _t5()
    layers = cglora.target_layers(model, ["q", "v"], nn.Linear)
    kw = dict(loss=cglora.seq2seq_lm_loss, folds=1)
    own = cglora.collect_statistics(model, layers, [batch], **kw)
    wrapped = cglora.collect_statistics(Wrapper(model), layers, [batch], **kw)
    for name in layers:
        for a, b in zip(own[name][:3], wrapped[name][:3]):  # S, G, T
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_t5_token_labels_take_the_seq2seq_loss_unless_another_loss_is_given():
    ids, mask = _padded(1, (2, 6), 50, (6, 3))
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids)
    _assert_G_is_autograd(_t5(), ["q", "v"], batch)  # recognised from the class
    model = _t5()
    with pytest.raises(ValueError, match="pass loss=cglora.seq2seq_lm_loss"):
        cglora.collect_statistics(model, {"q": model.encoder.block[0].layer[0].SelfAttention.q}, [batch],
                                  loss=lambda logits, labels: logits.sum())


def test_bart_labels_build_the_decoder_inputs_and_G_equals_autograd():
    config = transformers.BartConfig(vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config)
    ids, mask = _padded(3, (3, 8), 50, (8, 5, 6), pad=1)
    labels, decoder_mask = _padded(4, (3, 6), 50, (6, 3, 4))
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(decoder_mask == 0, -100))
    _assert_G_is_autograd(model, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], batch,
                          loss=cglora.seq2seq_lm_loss)


def _bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


@pytest.mark.parametrize("return_dict", [True, False])
def test_bert_padded_and_tuple_outputs_equal_autograd(return_dict):
    ids, mask = _padded(5, (3, 7), 50, (7, 2, 5))
    batch = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([2, 0, 1]), return_dict=return_dict)
    _assert_G_is_autograd(_bert(), ["query", "value", "dense"], batch,
                          reference=lambda out: out.loss if return_dict else out[0])


_SIZES = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=32)
_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(dtype=torch.float32):
    config = transformers.LlamaConfig(**_SIZES, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def test_llama_padded_causal_lm_equals_autograd():
    ids, mask = _padded(6, (3, 9), 50, (9, 6, 4))
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    _assert_G_is_autograd(_llama(), _DECODER, batch, loss=cglora.causal_lm_loss)


def test_llama_labels_that_count_padding_equal_autograd_of_its_own_loss():
    """labels = input ids, padding not set to -100: transformers' loss counts the padded targets, and so do
    G and T (a mask keeps rows out of S only); the causal loss is recognised from the class."""
    ids, mask = _padded(6, (3, 9), 50, (9, 6, 4))
    _assert_G_is_autograd(_llama(), ["q_proj", "v_proj", "o_proj", "down_proj"],
                          dict(input_ids=ids, attention_mask=mask, labels=ids.clone()))


def _deberta():
    config = transformers.DebertaV2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        relative_attention=True, position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"],
        share_att_key=True, norm_rel_ebd="layer_norm", num_labels=3)
    torch.manual_seed(0)
    return transformers.DebertaV2ForSequenceClassification(config)


@pytest.mark.parametrize("length", [8, 7])
def test_deberta_projections_of_relative_positions_keep_every_row_whatever_the_length(length):
    """DeBERTa applies query_proj and key_proj to its relative-position table [1, 2 * 4, d] too: at one
    example of length 8 the batch's mask has the table's shape, and still only the token rows are masked."""
    ids, mask = _padded(7, (1, length), 50, (5,))
    batch = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([1]))
    model = _deberta()
    layers, stats = _assert_G_is_autograd(model, ["query_proj", "key_proj", "value_proj"], batch)
    name = "deberta.encoder.layer.0.attention.self.query_proj"
    calls = _call_inputs(model, layers[name], batch)  # the tokens [1, L, d], then the table [1, 8, d]
    assert [tuple(c.shape[:2]) for c in calls] == [(1, length), (1, 8)]
    x = torch.cat([calls[0][mask.bool()], calls[1][0]])
    torch.testing.assert_close(stats[name].S, x.T @ x / (5 + 8), atol=1e-6, rtol=1e-5)


def test_bert_masked_lm_is_recognised_and_equals_autograd():
    """A masked LM predicts each position's own label (no shift): masked_lm_loss, taken from the class."""
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    torch.manual_seed(0)
    ids, mask = _padded(8, (3, 7), 50, (7, 4, 6))
    labels = ids.masked_fill((mask == 0) | (torch.arange(7) % 3 != 0), -100)
    _assert_G_is_autograd(transformers.BertForMaskedLM(config), ["query", "value", "dense"],
                          dict(input_ids=ids, attention_mask=mask, labels=labels))


def test_classification_labels_of_shape_batch_by_one_equal_autograd():
    ids, mask = _padded(5, (3, 7), 50, (7, 2, 5))
    _assert_G_is_autograd(_bert(), ["query", "value"],
                          dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([[2], [0], [1]])))


MORE_FAMILIES = {  # a tiny random model, its targets: every nn.Linear of the model but its LM head
    "mistral-sliding-window": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **_SIZES, num_key_value_heads=2, sliding_window=3)), _DECODER),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **_SIZES, num_key_value_heads=2, head_dim=8)), _DECODER),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        **{k: v for k, v in _SIZES.items() if k != "intermediate_size"}, ffn_dim=64,
        word_embed_proj_dim=32, pad_token_id=1)), ["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                   "fc2"]),
    "gpt-neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_SIZES)),
                 ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "modernbert": (lambda: transformers.ModernBertForSequenceClassification(
        transformers.ModernBertConfig(**_SIZES, num_labels=3, local_attention=4, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                      sep_token_id=2)), ["Wqkv", "Wo", "Wi", "dense", "classifier"]),
    "bert-regression": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        **_SIZES, num_labels=1)), ["query", "key", "value", "dense", "classifier"]),
    "llama-checkpointing": (lambda: _llama(), _DECODER),
}


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_more_families_padded_equal_autograd_of_their_own_loss(family):
    """Causal LMs (labels -100 on padding), ModernBERT's classes and BERT's float regression
    targets (its MSE) on padded batches. Mistral's window (3 of 9 tokens) changes its logits;
    with gradient checkpointing the reference loss is the training one (recomputed in backward),
    while collect_statistics runs in eval mode."""
    make, targets = MORE_FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    ids, mask = _padded(6, (3, 9), 50, (9, 6, 4), pad=1 if family == "opt" else 0)
    labels = ids.masked_fill(mask == 0, -100)
    if family in ("modernbert", "bert-regression"):
        labels = torch.tensor([2, 0, 1]) if family == "modernbert" else torch.tensor([0.3, -1.2, 2.])
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    reference = lambda out: out.loss  # noqa: E731
    if family == "mistral-sliding-window":
        logits = model.eval()(input_ids=ids, attention_mask=mask).logits
        model.config.sliding_window = None
        assert (model(input_ids=ids, attention_mask=mask).logits - logits).abs().max() > 1e-2
        model.config.sliding_window = 3
    if family == "llama-checkpointing":
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        reference = lambda out: model.train()(**batch).loss  # noqa: E731
    _assert_G_is_autograd(model, targets, batch, reference=reference)


# ---------------------------------------------------------------------------- peft

FAMILIES = {  # model, targets, peft task, calibration batches (labels included), the loss add_lora's route takes
    "bert": (_bert, ["query", "value"], "SEQ_CLS", None),
    "llama": (_llama, ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM", cglora.causal_lm_loss),
}


def _calibration(family):
    batches = []
    for seed in range(4):
        ids, mask = _padded(seed, (4, 9), 50, (9, 5, 7, 9))
        labels = ids.masked_fill(mask == 0, -100) if family == "llama" else torch.arange(4) % 3
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_initialize_peft_is_add_lora_and_init_adapters_saves_reloads_and_trains(tmp_path, family, dtype):
    peft = pytest.importorskip("peft")
    make, targets, task, loss = FAMILIES[family]
    batches = _calibration(family)
    model = make().to(dtype)  # our route: the same random model, the same rank and alpha
    layers = cglora.add_lora(model, targets, rank=4, alpha=8, rslora=True)
    stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, batches, loss=loss)
    cglora.init_adapters(layers, stats, "cg-lora")

    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=targets, task_type=task)
    peft_model = peft.get_peft_model(make().to(dtype), config)
    report = cglora.initialize_peft(peft_model, batches)  # the LM's loss recognised by itself
    assert len(report) == len(layers) and all(r["captured"] > 0 for r in report)
    lora = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(lora) == sorted(layers)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-4, rtol=2e-2)
    for name, m in lora.items():  # peft's s B A is ours
        ours = layers[name].delta_weight().float()
        assert ours.abs().max() > 0
        torch.testing.assert_close(m.get_delta_weight("default").float(), ours, **tol)

    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    logits = peft_model.eval()(**inputs).logits
    peft_model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make().to(dtype), tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs).logits, logits, atol=1e-6, rtol=1e-5)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []  # in eval mode: no dropout noise in the comparison
    for _ in range(5):
        out = peft_model(**batches[0])
        losses.append(out.loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


def test_initialize_peft_refuses_shifted_inits_unknown_options_and_models_without_its_adapter():
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    batches = _calibration("bert")
    for method in ("cg-lora-shift", "lora-ga"):
        with pytest.raises(ValueError, match=f"initialize_peft: {method} shifts W0.* use cg-lora"):
            cglora.initialize_peft(peft_model, batches, method)
    with pytest.raises(TypeError, match=r"initialize_peft got \['rank'\]"):
        cglora.initialize_peft(peft_model, batches, rank=4)
    with pytest.raises(TypeError, match=r"initialize_peft got \['log'\]"):  # the init logs nothing
        cglora.initialize_peft(peft_model, batches, log=print)
    error = "damping must be a number >= 0, got 'auto' .*choose_damping"  # choose it, then pass it
    with pytest.raises(ValueError, match=error):
        cglora.initialize_peft(peft_model, batches, damping="auto")
    with pytest.raises(ValueError, match="no peft LoRA layer holds an adapter 'other'"):
        cglora.initialize_peft(peft_model, batches, adapter_name="other")
    dora = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(ValueError, match=r"\(DoraLinearVariant\)'\] are a LoRA variant .* not W0 \+ s B A"):
        cglora.initialize_peft(dora, batches)
    embedded = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=["query", "word_embeddings"]))
    with pytest.raises(ValueError, match=r"word_embeddings'\] have LoRA on an embedding.*leave embeddings out"):
        cglora.initialize_peft(embedded, batches)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="call it outside torch.no_grad"):
        cglora.initialize_peft(peft_model, batches)
    peft_model = peft.get_peft_model(_t5(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"],
                                                             task_type="SEQ_2_SEQ_LM"))
    ids, mask = _padded(1, (2, 6), 50, (6, 3))
    report = cglora.initialize_peft(peft_model, [dict(input_ids=ids, attention_mask=mask, labels=ids)] * 2,
                                    damping=1.0)  # the seq2seq loss, recognised
    assert len(report) == 2 * 2 + 2 * 4 and all(r["fallback"] is None for r in report)


@pytest.mark.parametrize("method, rslora", [("cg-lora", True), ("cg-lora", False), ("cg-lora-shift", True)])
def test_save_peft_reloads_in_peft_to_our_logits_without_restating_the_scale(tmp_path, method, rslora):
    peft = pytest.importorskip("peft")
    model, batches = _bert(), _calibration("bert")
    layers = cglora.add_lora(model, ["query", "value"], rank=4, alpha=8, rslora=rslora,
                             trainable=["classifier", "pooler"])
    stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, batches)
    cglora.init_adapters(layers, stats, method)
    with torch.no_grad():  # as if trained: adapters and the modules trained whole move
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    config = cglora.save_peft(model, tmp_path, modules_to_save=["classifier", "pooler"])
    assert (config["r"], config["use_rslora"]) == ((8, False) if method == "cg-lora-shift" else (4, rslora))
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    loaded = peft.PeftModel.from_pretrained(_bert(), tmp_path).eval()  # the original checkpoint
    torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, atol=1e-5, rtol=1e-4)


def _tied_llama():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_initialize_peft_refuses_an_adapter_tied_to_another_and_takes_an_untied_lm_head():
    """ensure_weight_tying ties the embedding's adapter to lm_head's: its gradient sums both uses, so it is
    refused; without it lm_head's adapter is its own, and its G is lm_head's use alone (exact)."""
    peft = pytest.importorskip("peft")
    batches = _calibration("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about tied layers in the adapter
        tied = peft.get_peft_model(_tied_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                                  ensure_weight_tying=True))
        own = peft.get_peft_model(_tied_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"share their weights with a target's \(ensure_weight_tying\)"):
        cglora.initialize_peft(tied, batches)
    report = cglora.initialize_peft(own, batches)
    assert [r["layer"] for r in report if r["captured"] > 0][-1].endswith("lm_head")
    head = own.base_model.model.lm_head
    with own.disable_adapter():
        stats = cglora.collect_statistics(own, {"head": head.base_layer}, batches)
    n = [(b["labels"][:, 1:] != -100).sum() for b in batches]  # target tokens: the loss's terms
    head.base_layer.weight.requires_grad_(True)
    with own.disable_adapter():
        loss = sum(own(**b).loss * k for b, k in zip(batches, n)) / sum(n)
    grad, = torch.autograd.grad(loss, head.base_layer.weight)  # both uses: the embedding's rows too
    ids = torch.cat([b["input_ids"].flatten() for b in batches]).unique()
    rest = torch.ones(50, dtype=torch.bool)
    rest[ids] = False  # tokens never input: the gradient there is the head's use alone
    assert (stats["head"].G[rest] - grad[rest]).norm() <= 1e-5 * grad[rest].norm()


def test_initialize_peft_on_gpt2_conv1d_takes_the_causal_loss_and_its_first_order_decrease():
    """GPT-2's c_attn, c_proj are Conv1D (y = x W + b, W d_in x d_out; peft: fan_in_fan_out): G is the
    gradient of W^T, the adapter computes B A x, and the loss falls along s B A as <G, s B A> says."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    make = lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2,
                                                                        n_head=4)).eval()
    batches = _calibration("llama")
    gpt2 = make()
    layers = {n: m for n, m in gpt2.named_modules() if type(m).__name__ == "Conv1D"}
    stats = cglora.collect_statistics(gpt2, layers, batches)  # the causal loss, from the class
    n = [(b["labels"][:, 1:] != -100).sum() for b in batches]  # target tokens: the loss's terms
    loss = sum(gpt2(**b).loss * k for b, k in zip(batches, n)) / sum(n)
    grads = torch.autograd.grad(loss, [m.weight for m in layers.values()])
    for name, grad in zip(layers, grads):
        assert (stats[name].G - grad.T).norm() <= 1e-5 * grad.norm(), name
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set to True for Conv1D
        peft_model = peft.get_peft_model(make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn",
                                                                                                     "c_proj"]))
    report = cglora.initialize_peft(peft_model, batches)
    assert len(report) == 6 and all(r["captured"] > 0 for r in report)  # c_proj: attention's and the MLP's
    lora = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
    slope = sum((stats[n].G * m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)).sum()
                for n, m in lora.items())
    assert slope < 0
    with torch.no_grad():
        losses = []
        peft_model.eval()  # no dropout
        for t in (0.0, 1e-3):
            for m in lora.values():
                m.scaling["default"] = t * m.lora_alpha["default"] / m.r["default"]
            losses.append(sum(peft_model(**b).loss * k for b, k in zip(batches, n)).item() / sum(n).item())
    torch.testing.assert_close(torch.tensor(losses[1] - losses[0]), 1e-3 * slope, rtol=2e-2, atol=0)


def test_initialize_peft_writes_fp32_adapters_on_a_bf16_base_unrounded():
    """peft keeps the adapters fp32 on a bf16 base: the factors are written at that dtype, not rounded to
    the base's bf16 (they equal the fp32 factors from the same statistics)."""
    peft = pytest.importorskip("peft")
    batches = _calibration("llama")
    peft_model = peft.get_peft_model(_llama(torch.bfloat16), peft.LoraConfig(r=2, lora_alpha=4,
                                                                             target_modules=["q_proj"]))
    cglora.initialize_peft(peft_model, batches, init_norm=0, factor_balance="curvature")
    lora = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
    with peft_model.disable_adapter():
        stats = cglora.collect_statistics(peft_model, {n: m.base_layer for n, m in lora.items()}, batches)
    for name, m in lora.items():
        A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert A.dtype == torch.float32 and not torch.equal(A, A.bfloat16().float())
        st = stats[name]
        want_B, want_A = cglora.cg_lora_factors(st.G, st.S, st.T, 2, scaling=m.scaling["default"],
                                                tol=cglora._FINAL_TOL)[:2]  # init_adapters' route
        torch.testing.assert_close(B @ A, want_B @ want_A, atol=1e-7, rtol=1e-4)


def test_add_lora_on_gpt2_conv1d_says_how_to_convert_it():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match=r"layer transformer\.h\.0\.attn\.c_attn is Conv1D, not nn\.Linear.*"
                                         r"nn\.Linear with weight = conv\.weight\.T"):
        add_lora(transformers.GPT2LMHeadModel(config), ["c_attn"], rank=2, alpha=4)


def _hf_checkpoint(tmp_path, glue, model_type):
    """A random Hugging Face *ForSequenceClassification checkpoint on disk (2 labels), with a WordPiece
    vocabulary of the CoLA fixture's words (ids below the model's 40; train.py takes any tokenizer)."""
    c, _, task = _hf_models(model_type, num_labels=2)
    task.save_pretrained(tmp_path / "checkpoint")
    texts = [t for ex in data.read_split(data.get_task("cola"), "train", glue) for t in ex[:2] if t]
    data.build_tokenizer(texts).save(tmp_path / "checkpoint")
    return c, tmp_path / "checkpoint"


@pytest.mark.parametrize("model_type, method", [("bert", "cg-lora"), ("bert", "cg-lora-shift"), ("roberta", "cg-lora"),
                                                ("roberta", "cg-lora-shift"), ("tiny", "cg-lora-shift")])
def test_run_loads_in_peft_with_our_logits(tmp_path, glue, model_type, method):
    """A run on a Hugging Face checkpoint under that checkpoint's names, the tiny encoder under ours: the
    adapter in peft, and merged.pt in the checkpoint's own *ForSequenceClassification, give our logits."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    flags = ["--init", method, "--targets", "query,key,value,attn_out,ffn_in,ffn_out", "--max_steps", "4", "--merge"]
    run = tmp_path / "run"
    if model_type == "tiny":
        _train(tmp_path, *flags)
        cfg = train.load_config(run)
        build = lambda: train.build_model(cfg, data.load_tokenizer(run / "tokenizer"), 2)  # noqa: E731
        base = build()
    else:
        _, checkpoint = _hf_checkpoint(tmp_path, glue, model_type)
        _train(tmp_path, "--pretrained", str(checkpoint), *flags)
        build = lambda: from_pretrained(checkpoint, num_labels=2)  # noqa: E731
        base = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    config = json.loads((run / "adapter_config.json").read_text())
    assert peft.LoraConfig(**config).r == (16 if method.endswith("shift") else 8)  # a key peft lacks: TypeError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base, run).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert set(torch.load(run / "adapter_model.bin")) == set(peft.get_peft_model_state_dict(theirs))  # none ignored
    ours, plain = build(), build()
    merged = torch.load(run / "merged.pt")
    if model_type != "tiny":  # under the checkpoint's own names: its *ForSequenceClassification loads it strictly
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        hf.load_state_dict(merged, strict=True)
        rename = train.hf_name(train.load_config(run), ours)
        merged = {key: merged[rename(key)] for key in ours.state_dict()}
    ours.load_state_dict(merged)
    plain.head.load_state_dict(ours.head.state_dict())  # the trained head without the adapters
    ids, mask, types = _batch(ours.config)
    with torch.no_grad():
        got, without = ours.eval()(ids, mask, types), plain.eval()(ids, mask, types)
        want = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if model_type != "tiny":
            assert (hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits - got).abs().max() <= 1e-5
    want = getattr(want, "logits", want)  # our encoder returns the logits themselves
    assert (got - want).abs().max() <= 1e-4 and (got - without).abs().max() > 1e-2
    back = build()
    assert len(load_adapter(back, run)) == 12  # and back into our encoder
    with torch.no_grad():
        assert (back.eval()(ids, mask, types) - got).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_load_adapter_saved_by_peft_gives_peft_logits(tmp_path, model_type):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    c, _, task = _hf_models(model_type, num_labels=2)
    task.save_pretrained(tmp_path / "checkpoint")
    config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["query", "output.dense"],
                             task_type="SEQ_CLS", modules_to_save=["pooler"] if model_type == "bert" else None)
    theirs = peft.get_peft_model(task, config)  # output.dense: attention.output.dense and the FFN's output.dense
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters and head, so that a skipped key shows
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "adapter")  # adapter_model.safetensors: read by our reader
    ours = from_pretrained(tmp_path / "checkpoint", num_labels=2)
    assert sorted(load_adapter(ours, tmp_path / "adapter")) == [
        f"layers.{i}.{n}" for i in (0, 1) for n in ("attn_out", "ffn_out", "query")]
    ids, mask, types = _batch(c)
    with torch.no_grad():
        got = ours.eval()(ids, mask, types)
        want = theirs.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        without = from_pretrained(tmp_path / "checkpoint", num_labels=2).eval()(ids, mask, types)
    assert (got - want).abs().max() <= 1e-5 and (got - without).abs().max() > 1e-2
    saved = tmp_path / "adapter" / "adapter_config.json"
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), use_dora=True)))
    with pytest.raises(ValueError, match="only a plain LoRA adapter .*'use_dora': True"):
        load_adapter(from_pretrained(tmp_path / "checkpoint", num_labels=2), tmp_path / "adapter")
