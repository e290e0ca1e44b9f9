"""cglora on a quantized base (QLoRA): bitsandbytes' 4-bit (NF4, FP4) and 8-bit layers, quantized on
the CPU; skipped without bitsandbytes and transformers. The statistics against autograd on a model
holding the weights the quantized layers compute with, the refusals of whatever moves W0, and a peft
adapter initialised, saved and reloaded onto the 4-bit base."""
import pytest
import torch
from torch import nn

import cglora

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
KINDS = ["nf4", "fp4", "int8"]


def _llama():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _quantized(model, kind, targets=TARGETS):
    """model with every target nn.Linear swapped for a bitsandbytes layer of `kind`, quantized on
    the CPU (.to quantizes the weight it was given)."""
    for name, m in [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]:
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None,
                                    has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.float32, quant_type=kind)
        q.load_state_dict(m.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


def _computed_with(layer):  # d_out x d_in: the weight a layer computes with, read off the identity
    with torch.no_grad():
        y = layer(torch.eye(layer.in_features))
    return (y - (0 if layer.bias is None else layer.bias)).T


def _dequantized(model):
    """A fresh model whose targets are nn.Linear holding the weights model's quantized layers
    compute with (every other weight is the same seeded one)."""
    reference = _llama()
    for name, m in model.named_modules():
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            reference.get_submodule(name).weight.data.copy_(_computed_with(m))
    return reference


def _batches():
    batches = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 50, (3, 8), generator=g)
        mask = (torch.arange(8) < torch.tensor([8, 5, 6])[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return batches


def _targets(model):
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}


def _bases(layers):  # add_lora's layers -> their base layers, which the statistics hook
    return {n: m.base for n, m in layers.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_statistics_of_quantized_layers_are_those_of_the_weights_they_compute_with(kind):
    """G is the gradient with respect to the dequantized weight (autograd on a model holding it as
    nn.Linear), S and T are that model's, and no weight gradient is made or weight changed. The
    8-bit matmul rounds its input to fp16 where a gradient flows, forward and backward: G is the
    gradient of that rounded computation, within 2e-2 of the fp32 one (T, quadratic in it)."""
    tol = 2e-2 if kind == "int8" else 1e-5  # relative, in the Frobenius norm
    model = _quantized(_llama(), kind)
    layers, batches = _targets(model), _batches()
    assert all(not m.weight.is_floating_point() for m in layers.values())
    packed = {n: m.weight.detach().clone() for n, m in layers.items()}
    reference = _dequantized(model)
    original = _llama()
    for name in layers:  # the quantization moved the weights: the reference is not the fp32 model
        assert not torch.allclose(reference.get_submodule(name).weight,
                                  original.get_submodule(name).weight)
    torch.testing.assert_close(model(**batches[0]).logits, reference(**batches[0]).logits,
                               atol=1e-5, rtol=1e-5)

    stats = cglora.collect_statistics(model, layers, batches[:1])
    ours = _targets(reference)
    grads = torch.autograd.grad(reference(**batches[0]).loss, [m.weight for m in ours.values()])
    for name, grad in zip(layers, grads):
        assert grad.norm() > 0
        assert (stats[name].G - grad).norm() <= tol * grad.norm(), name
    exact = cglora.collect_statistics(reference, ours, batches[:1])
    for name in layers:
        for X, Y in zip(stats[name][:3], exact[name][:3]):
            assert (X - Y).norm() <= tol * Y.norm(), name
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(m.weight, packed[n]) for n, m in layers.items())


@pytest.mark.parametrize("kind", KINDS)
def test_add_lora_on_quantized_layers_inits_as_on_the_dequantized_model_and_refuses_moving_W0(kind):
    """add_lora takes the shapes from in_features / out_features (a 4-bit weight is packed), float
    factors; cg-lora and lora-one equal their init on the dequantized model (8-bit: within the fp16
    rounding of its input, as above); a shift, a merge are refused."""
    tol = 5e-2 if kind == "int8" else 1e-4
    model = _quantized(_llama(), kind)
    reference = _dequantized(model)
    batches = _batches()
    for method in ("cg-lora", "lora-one"):
        mine, theirs = (cglora.add_lora(m, TARGETS, rank=4, alpha=8, rslora=True)
                        for m in (model, reference))
        assert all(m.lora_A.dtype == torch.float32 and m.lora_A.shape == (4, m.base.in_features)
                   and m.lora_B.shape == (m.base.out_features, 4) for m in mine.values())
        assert cglora.statistics_mib(mine) == cglora.statistics_mib(theirs)
        stats = cglora.collect_statistics(model, _bases(mine), batches)
        exact = cglora.collect_statistics(reference, _bases(theirs), batches)
        cglora.init_adapters(mine, stats, method)
        cglora.init_adapters(theirs, exact, method)
        for name, layer in mine.items():
            want = theirs[name].delta_weight()
            assert want.abs().max() > 0
            assert (layer.delta_weight() - want).norm() <= tol * want.norm(), name
        for m in (model, reference):  # the next method starts from the bare model again
            for name, layer in _targets(m).items():
                parent, _, child = name.rpartition(".")
                setattr(m.get_submodule(parent), child, layer.base)

    layers = cglora.add_lora(model, TARGETS, rank=4, alpha=8)
    stats = cglora.collect_statistics(model, _bases(layers), batches)
    before = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    for method in ("cg-lora-shift", "lora-ga"):
        with pytest.raises(ValueError, match=rf"{method} shifts W0, and their weights are "
                                             "quantized.*use cg-lora or lora-one"):
            cglora.init_adapters(layers, stats, method)
    layer = next(iter(layers.values()))
    with pytest.raises(ValueError, match=r"quantized \(torch.u?int8\): merging would requantize"):
        layer.merge()
    with pytest.raises(ValueError, match=r"quantized .* write with shift=False"):
        cglora.write_adapter(layer, layer.lora_B.detach(), layer.lora_A.detach(), shift=True)
    assert not layer.merged
    assert all(torch.equal(m.base.weight, before[n]) for n, m in layers.items())


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_lora_ga_factors_from_a_4bit_layers_hooks_are_the_dequantized_models(kind):
    """Where peft's LoRA-GA refuses a quantized model (it needs weight gradients), LoRA-GA's factors
    come from the hooks' G of the 4-bit layers: the same B and A as from the dequantized model's
    nn.Linear statistics, and not the fp32 model's (the quantization moved them). Only its init,
    which shifts W0, is refused (above). 8-bit rounds its input to fp16, which turns LoRA-GA's 5th
    to 8th singular vectors (small gaps): 4 bits only."""
    model = _quantized(_llama(), kind)
    reference, original = _dequantized(model), _llama()
    stats, exact, fp32 = (cglora.collect_statistics(m, _targets(m), _batches())
                          for m in (model, reference, original))
    for name in stats:
        B, A = cglora.lora_ga_factors(stats[name].G, 4)
        B_ref, A_ref = cglora.lora_ga_factors(exact[name].G, 4)
        assert (B - B_ref).norm() <= 1e-4 * B_ref.norm(), name
        assert (A - A_ref).norm() <= 1e-4 * A_ref.norm(), name
        B_fp32, A_fp32 = cglora.lora_ga_factors(fp32[name].G, 4)
        assert (B - B_fp32).norm() > 1e-2 * B_fp32.norm(), name


def test_lora_factors_take_a_4bit_layers_compute_dtype():
    q = bnb.nn.Linear4bit(32, 16, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.load_state_dict(nn.Linear(32, 16).state_dict())
    layer = cglora.LoRALinear(q.to("cpu"), rank=2, alpha=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_initialize_peft_on_a_4bit_checkpoint_saves_and_reloads_to_the_same_logits(tmp_path,
                                                                                   quant_type):
    """As a QLoRA user: the checkpoint loaded in 4 bits by transformers, wrapped by peft (its
    bitsandbytes LoRA layer); cg-lora and lora-one equal their init on the dequantized model, peft's
    adapter reloads onto the 4-bit base to the same logits; lora-ga is refused."""
    peft = pytest.importorskip("peft")
    _llama().save_pretrained(tmp_path / "base")
    bits = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_compute_dtype=torch.float32)

    def base():
        return transformers.LlamaForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=bits, device_map="cpu")

    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS[:2],
                             task_type="CAUSAL_LM")
    batches = _batches()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    for method in ("cg-lora", "lora-one"):
        peft_model = peft.get_peft_model(base(), config)
        lora = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert all(isinstance(m, peft.tuners.lora.bnb.Linear4bit) for m in lora.values())
        cglora.initialize_peft(peft_model, batches, method)

        quantized = base()  # our route on the dequantized model: the same s B A
        reference = _dequantized(quantized)
        layers = cglora.add_lora(reference, TARGETS[:2], rank=4, alpha=8, rslora=True)
        stats = cglora.collect_statistics(reference, _bases(layers), batches)
        cglora.init_adapters(layers, stats, method)
        for name, m in lora.items():
            assert m.lora_A["default"].weight.dtype == torch.float32
            torch.testing.assert_close(m.get_delta_weight("default").float(),
                                       layers[name].delta_weight(), atol=1e-6, rtol=1e-4)

        logits = peft_model.eval()(**inputs).logits
        peft_model.save_pretrained(tmp_path / method)
        loaded = peft.PeftModel.from_pretrained(base(), tmp_path / method).eval()
        torch.testing.assert_close(loaded(**inputs).logits, logits, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="initialize_peft: lora-ga shifts W0"):
        cglora.initialize_peft(peft_model, batches, "lora-ga")
