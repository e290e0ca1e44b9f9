"""The BERT/RoBERTa encoder that CG-LoRA adapts: a tiny built-in preset, and a converter that
loads Hugging Face BERT and RoBERTa checkpoints from a local directory.

Reading order: config -> transformer block -> encoder with its classification head ->
tiny preset -> checkpoint reading (safetensors, config.json) -> from_pretrained -> a peft adapter
back into our model (load_adapter).
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cglora


@dataclass
class EncoderConfig:
    vocab_size: int = 30522  # BERT uncased WordPiece; tiny_config sets it to the tokenizer in use
    hidden: int = 128  # small enough to train CoLA on 2 CPU cores in minutes
    layers: int = 2  # two post-LN blocks: the fewest that still stack attention
    heads: int = 4  # head size 32
    intermediate: int = 512  # feed-forward width, 4 x hidden as in BERT
    max_positions: int = 512  # longest sequence (RoBERTa needs pad_id + 1 more rows)
    type_vocab_size: int = 2  # segment A / B for sentence-pair tasks (RoBERTa checkpoints: 1)
    pad_id: int = 0  # [PAD] in BERT vocabularies; <pad> = 1 in RoBERTa's
    layer_norm_eps: float = 1e-12  # BERT's value (RoBERTa checkpoints say 1e-5 in config.json)
    roberta_positions: bool = False  # True: positions count from pad_id + 1 and skip padding
    dropout: float = 0.1  # hidden, attention and head dropout, as hidden_dropout_prob in HF
    num_labels: int = 2  # 1 = regression (STS-B)
    model_type: str = "tiny"  # "bert" | "roberta" | "tiny": decides the head's dropout placement


class Block(nn.Module):
    """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden
        self.heads, self.dropout_p = config.heads, config.dropout
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, config.intermediate)
        self.ffn_out = nn.Linear(config.intermediate, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        # x: [batch, length, hidden]; mask: [batch, 1, 1, length] bool, True = attend
        B, L, H = x.shape
        q, k, v = (f(x).view(B, L, self.heads, H // self.heads).transpose(1, 2)
                   for f in (self.query, self.key, self.value))  # each [batch, heads, length, head]
        p = self.dropout_p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = self.attn_norm(x + self.dropout(self.attn_out(a.transpose(1, 2).reshape(B, L, H))))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class Encoder(nn.Module):
    """Embeddings + LayerNorm, `layers` post-LN blocks, and a first-token classification head."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden, padding_idx=c.pad_id)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden)
        self.embed_norm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.head = nn.ModuleDict(dict(dense=nn.Linear(c.hidden, c.hidden),
                                       out_proj=nn.Linear(c.hidden, c.num_labels)))
        self.apply(self._init_weights)

    def _init_weights(self, module, std=0.02):
        # as HF BERT/RoBERTa: normal(0, 0.02) weights, zero biases and padding row,
        # LayerNorm = identity
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def encode(self, input_ids, attention_mask=None, token_type_ids=None):
        """Last hidden states [batch, length, hidden]. attention_mask: 1 = token, 0 = padding."""
        c, (B, L) = self.config, input_ids.shape
        longest = c.max_positions - (c.pad_id + 1 if c.roberta_positions else 0)
        if L > longest:
            raise ValueError(f"sequence length {L} exceeds this model's {longest} positions: "
                             f"truncate inputs to at most {longest} tokens")
        # fairseq/HF: real tokens get pad_id+1, pad_id+2, ...; padding gets pad_id
        if c.roberta_positions:
            real = (input_ids != c.pad_id).long()
            positions = torch.cumsum(real, dim=1) * real + c.pad_id
        else:
            positions = torch.arange(L, device=input_ids.device).expand(B, L)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        x = self.dropout(self.embed_norm(x))  # [batch, length, hidden]
        # [batch, 1, 1, length]: padding keys ignored
        mask = attention_mask.bool()[:, None, None, :]
        for block in self.layers:
            x = block(x, mask)
        return x

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Logits [batch, num_labels] (num_labels == 1: a regression score) from the first token."""
        x = self.encode(input_ids, attention_mask, token_type_ids)[:, 0]  # [batch, hidden]
        # RobertaClassificationHead drops its input; BERT's pooler does not
        if self.config.model_type != "bert":
            x = self.dropout(x)
        x = self.dropout(torch.tanh(self.head.dense(x)))
        return self.head.out_proj(x)


def tiny_config(vocab_size: int, num_labels: int, pad_id: int = 0) -> EncoderConfig:
    """The built-in model: random init, no download, trains CoLA on a laptop CPU in minutes."""
    return EncoderConfig(vocab_size=vocab_size, num_labels=num_labels, pad_id=pad_id)


# ---------------------------------------------------------------------------------------------
# Reading Hugging Face checkpoints

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """Read a .safetensors file: u64 header length N (little-endian), N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}}, then raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if len(data) < 8 or 8 + n > len(data):
        raise ValueError(f"{path}: truncated safetensors file ({len(data)} bytes, header says "
                         f"{n} header bytes): re-download or re-save the checkpoint")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({e}): re-download the "
                         "checkpoint")
    tensors, start = {}, 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; "
                             f"this reader supports {sorted(_DTYPES)}")
        dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or start + end > len(data):
            raise ValueError(f"{path}: tensor {name!r} bytes [{begin}, {end}) do not hold shape "
                             f"{shape} of {info['dtype']} inside the file: the file is damaged")
        flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin) if count
                else torch.empty(0, dtype=dtype))
        tensors[name] = flat.reshape(shape)
    return tensors


SUPPORTED_MODEL_TYPES = ("bert", "roberta")


def config_from_hf(hf: dict, num_labels: int) -> EncoderConfig:
    """EncoderConfig from a Hugging Face config.json dict."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json has model_type {kind!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if (hf.get("hidden_act", "gelu") != "gelu"
            or hf.get("position_embedding_type", "absolute") != "absolute"):
        raise ValueError(f"config.json asks for hidden_act {hf.get('hidden_act')!r}, "
                         f"position_embedding_type {hf.get('position_embedding_type')!r}; "
                         "supported: 'gelu' with 'absolute' positions")
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            pad_id=hf.get("pad_token_id", 1 if kind == "roberta" else 0),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), roberta_positions=kind == "roberta",
            dropout=hf.get("hidden_dropout_prob", 0.1), num_labels=num_labels, model_type=kind)
    except KeyError as e:
        raise ValueError(f"config.json lacks {e}, which a {kind} config must have") from None


def hf_names(config: EncoderConfig) -> dict:
    """Our parameter name -> Hugging Face name, without the `bert.` / `roberta.` prefix."""
    names = {f"{m}.weight": f"embeddings.{m}.weight"
             for m in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    names |= {"embed_norm.weight": "embeddings.LayerNorm.weight",
              "embed_norm.bias": "embeddings.LayerNorm.bias"}
    block = dict(query="attention.self.query", key="attention.self.key",
                 value="attention.self.value",
                 attn_out="attention.output.dense", attn_norm="attention.output.LayerNorm",
                 ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm")
    for i in range(config.layers):
        for ours, theirs in block.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    # BertForSequenceClassification = pooler + classifier; RobertaForSequenceClassification =
    # classifier.{dense,out_proj}
    head = (dict(dense="pooler.dense", out_proj="classifier") if config.model_type == "bert"
            else dict(dense="classifier.dense", out_proj="classifier.out_proj"))
    for ours, theirs in head.items():
        for p in ("weight", "bias"):
            names[f"head.{ours}.{p}"] = f"{theirs}.{p}"
    return names


def _strip(key):
    """`roberta.x` / `bert.x` -> `x`; LayerNorm gamma/beta (old BERT checkpoints) -> weight/bias."""
    key = key.removeprefix("roberta.").removeprefix("bert.")
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                      "LayerNorm.bias")


def from_pretrained(path, num_labels: int) -> Encoder:
    """Load a Hugging Face BERT or RoBERTa checkpoint directory (config.json + model.safetensors or
    pytorch_model.bin). The head is loaded where the checkpoint has one, else freshly
    initialised."""
    expected = "config.json and model.safetensors (or pytorch_model.bin)"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist: it should hold "
                                f"{expected}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: a checkpoint directory holds "
                                f"{expected}")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    config = config_from_hf(hf, num_labels)
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        raw = read_safetensors(st)
    elif os.path.isfile(pt):
        raw = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin (sharded "
                                f"checkpoints are not supported): it should hold {expected}")
    state = {_strip(k): v for k, v in raw.items()}

    model = Encoder(config)
    names = hf_names(config)
    # RoBERTa's pooler: unused by *ForSequenceClassification
    ignored = ("embeddings.position_ids", "embeddings.token_type_ids", "lm_head.", "cls.") + \
        (("pooler.",) if config.model_type == "roberta" else ())
    missing = [theirs for ours, theirs in names.items() if theirs not in state
               and not ours.startswith("head.")]
    known = set(names.values())
    unexpected = [k for k in state if k not in known and not k.startswith(ignored)]
    if missing or unexpected:
        raise ValueError(f"{path} does not match a {config.model_type} encoder with "
                         f"{config.layers} layers:\n"
                         f"  missing keys: {missing}\n  unexpected keys: {unexpected}")
    ours_state = model.state_dict()
    std = hf.get("initializer_range", 0.02)
    with torch.no_grad():
        for ours, theirs in names.items():
            if theirs not in state:  # a head part the checkpoint lacks: fresh, initialised like HF
                if ours.endswith("weight"):
                    nn.init.normal_(ours_state[ours], std=std)
                else:
                    nn.init.zeros_(ours_state[ours])
                continue
            if state[theirs].shape != ours_state[ours].shape:
                raise ValueError(f"{path}: {theirs} has shape {tuple(state[theirs].shape)}, "
                                 f"expected {tuple(ours_state[ours].shape)} from config.json and "
                                 f"num_labels={num_labels}")
            ours_state[ours].copy_(state[theirs])
    return model


# ---------------------------------------------------------------------------------------------
# A peft LoRA adapter back into our model


def load_adapter(model: Encoder, path) -> dict:
    """Add the LoRA adapter in a peft directory (adapter_config.json + adapter_model.safetensors
    or .bin, saved by peft or by train.py) to `model`, the encoder it was trained on: Hugging Face
    names are mapped to ours through hf_names, the head saved with it is loaded, and every other
    weight is frozen. Returns {name: LoRALinear}. A shifted run's export loads as it was saved,
    rank 2r on the original W0."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    unsupported = {k: config[k] for k in ("rank_pattern", "alpha_pattern", "use_dora",
                                          "target_parameters")
                   if config.get(k)}
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{path}: only a plain LoRA adapter (peft_type LORA, bias none, one rank "
                         f"and alpha) loads here; got peft_type {config.get('peft_type')!r}, bias "
                         f"{config.get('bias')!r}, {unsupported or 'no patterns'}")
    st = os.path.join(path, "adapter_model.safetensors")
    pt = os.path.join(path, "adapter_model.bin")
    raw = (read_safetensors(st) if os.path.isfile(st)
           else torch.load(pt, map_location="cpu", weights_only=True))
    to_ours = ({theirs: ours for ours, theirs in hf_names(model.config).items()}
               # the tiny encoder: our names
               if model.config.model_type in SUPPORTED_MODEL_TYPES else {})
    state = {}
    # base_model.model.<module>.lora_A.weight, base_model.model.<head param>
    for key, value in raw.items():
        key = _strip(key.removeprefix("base_model.model."))
        module, lora, factor = key.partition(".lora_")  # factor: "A.weight" or "B.weight"
        if lora:
            module = to_ours.get(f"{module}.weight", f"{module}.weight").removesuffix(".weight")
            state[f"{module}.lora_{factor.removesuffix('.weight')}"] = value
        else:
            state[to_ours.get(key, key)] = value
    targets = sorted({key.rpartition(".lora_")[0] for key in state if ".lora_" in key})
    layers = cglora.add_lora(model, targets, config["r"], config["lora_alpha"],
                             config.get("lora_dropout", 0.0),
                             rslora=config.get("use_rslora", False), trainable=["head"])
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: {e}") from None
    missing = [k for k in result.missing_keys if k.endswith(("lora_A", "lora_B"))]
    if result.unexpected_keys or missing:
        raise ValueError(f"{path} does not fit this {model.config.model_type} encoder:\n  "
                         "keys that match "
                         f"nothing: {result.unexpected_keys}\n  factors missing: {missing}")
    return layers
