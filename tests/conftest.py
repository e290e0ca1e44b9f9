"""Fixtures and helpers shared by the tests of several modules: no test reaches the network
(_offline), GLUE-format fixture folders (glue, and the files behind them), a local HTTP server of
task archives (server), small checkpoints in Hugging Face's layout, and a tiny train.py run.

Real GLUE files are read from $GLUE_DIR, real tokenizer files from $TOKENIZERS_DIR/roberta-base and
$TOKENIZERS_DIR/all-minilm-l6-v2 (those tests skip when unset); Hugging Face parity tests skip
without transformers.
"""
import http.server
import json
import os
import struct
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import data
import train
from models import EncoderConfig, Encoder


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    """No test reaches the network: a download a test does not point elsewhere goes to an empty local folder."""
    monkeypatch.setenv("GLUE_URL", tmp_path_factory.mktemp("no-mirror").as_uri())


def _small_config(model_type, num_labels=3):
    pad = 1 if model_type == "roberta" else 0
    return EncoderConfig(vocab_size=40, hidden=32, layers=2, heads=4, intermediate=64,
                         max_positions=24 + pad + 1, type_vocab_size=2, pad_id=pad, layer_norm_eps=1e-5,
                         roberta_positions=model_type == "roberta", num_labels=num_labels, model_type=model_type)


def _batch(config, seed=0):
    """A padded batch [3, 10]: real lengths 10, 4, 7; ids never equal pad_id; segment B from the middle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (3, 10), generator=g)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, n in enumerate((10, 4, 7)):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, config.pad_id)
    types = (torch.arange(10) >= 3).long().expand(3, 10) * mask
    return ids, mask, types


def _perturb(model, seed=0):
    """Move every parameter (LayerNorms too) away from its init, so a swapped key cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _hf_config_json(c: EncoderConfig):
    return dict(model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden,
                num_hidden_layers=c.layers, num_attention_heads=c.heads, intermediate_size=c.intermediate,
                max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size,
                pad_token_id=c.pad_id, layer_norm_eps=c.layer_norm_eps, hidden_act="gelu",
                hidden_dropout_prob=c.dropout)


def _write_safetensors(path, tensors, metadata=None):
    """Written by hand from the format spec: u64 LE header length, JSON header, raw LE bytes."""
    header, chunks, offset = {}, [], 0
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = dict(dtype=codes[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))


# Our module -> its Hugging Face name, written out from transformers' BertModel / RobertaModel, not taken
# from models.hf_names: checkpoints are saved by this layout and loaded by that map; {p}: "bert." or "roberta."
_HF_LAYOUT = {
    "word_embeddings": "{p}embeddings.word_embeddings", "position_embeddings": "{p}embeddings.position_embeddings",
    "token_type_embeddings": "{p}embeddings.token_type_embeddings", "embed_norm": "{p}embeddings.LayerNorm",
    "layers.{i}.query": "{p}encoder.layer.{i}.attention.self.query",
    "layers.{i}.key": "{p}encoder.layer.{i}.attention.self.key",
    "layers.{i}.value": "{p}encoder.layer.{i}.attention.self.value",
    "layers.{i}.attn_out": "{p}encoder.layer.{i}.attention.output.dense",
    "layers.{i}.attn_norm": "{p}encoder.layer.{i}.attention.output.LayerNorm",  # after attention
    "layers.{i}.ffn_in": "{p}encoder.layer.{i}.intermediate.dense",
    "layers.{i}.ffn_out": "{p}encoder.layer.{i}.output.dense",
    "layers.{i}.ffn_norm": "{p}encoder.layer.{i}.output.LayerNorm",  # after the feed-forward
}


_HF_HEAD_LAYOUT = {"bert": {"head.dense": "bert.pooler.dense", "head.out_proj": "classifier"},
                   "roberta": {"head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"}}


def _hf_layout(model_type, layers):
    """{Hugging Face key of a *ForSequenceClassification checkpoint: our parameter name}."""
    modules = {ours.format(i=i): theirs.format(i=i, p=model_type + ".")
               for ours, theirs in _HF_LAYOUT.items() for i in range(layers)} | _HF_HEAD_LAYOUT[model_type]
    return {f"{theirs}.{p}": f"{ours}.{p}" for ours, theirs in modules.items()
            for p in (("weight",) if ours.endswith("embeddings") else ("weight", "bias"))}


def _save_ours_as_hf(model, path, fmt):
    """Our weights in Hugging Face key layout (_HF_LAYOUT): encoder keys `<model_type>.…`, head keys bare."""
    os.makedirs(path, exist_ok=True)
    c, state = model.config, model.state_dict()
    hf = {theirs: state[ours] for theirs, ours in _hf_layout(c.model_type, c.layers).items()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config_json(c), f)
    if fmt == "safetensors":
        _write_safetensors(os.path.join(path, "model.safetensors"), hf)
    else:
        torch.save(hf, os.path.join(path, "pytorch_model.bin"))
    return hf


def _hf_models(model_type, num_labels, seed=0):
    transformers = pytest.importorskip("transformers")
    c = _small_config(model_type)
    kind = {"bert": "Bert", "roberta": "Roberta"}[model_type]
    config = getattr(transformers, kind + "Config")(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.intermediate, max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size,
        pad_token_id=c.pad_id, layer_norm_eps=c.layer_norm_eps, num_labels=num_labels)
    torch.manual_seed(seed)
    base = _perturb(getattr(transformers, kind + "Model")(config), seed).eval()
    task = _perturb(getattr(transformers, kind + "ForSequenceClassification")(config), seed + 1).eval()
    return c, base, task


_HERE = Path(__file__).resolve().parents[1]  # the repository root


# The real GLUE layouts (as GLUE's download_glue_data.py writes them):
# file -> (header line or None, row(text_a, text_b, raw_label) -> fields).
_MNLI_TRAIN = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t" \
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"


_MNLI_DEV = _MNLI_TRAIN.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")


_MNLI_ID = ["0", "31193", "31193n", "government", "( a )", "( b )", "(ROOT a)", "(ROOT b)"]  # before sentence1


def _both(header, row):
    return {"train.tsv": (header, row), "dev.tsv": (header, row)}


_FORMATS = {
    "cola": _both(None, lambda a, b, y: ["gj04", y, "" if y == "1" else "*", a]),
    "sst-2": _both("sentence\tlabel", lambda a, b, y: [a, y]),
    "mrpc": _both("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda a, b, y: [y, "1355540", "1355592", a, b]),
    "qqp": _both("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", lambda a, b, y: ["7", "13", "14", a, b, y]),
    "sts-b": _both("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                   lambda a, b, y: ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", a, b, y]),
    "mnli": {"train.tsv": (_MNLI_TRAIN, lambda a, b, y: [*_MNLI_ID, a, b, y, y]),  # label1, gold_label
             "dev_matched.tsv": (_MNLI_DEV, lambda a, b, y: [*_MNLI_ID, a, b, *[y] * 6]),  # label1-5, gold_label
             "dev_mismatched.tsv": (_MNLI_DEV, lambda a, b, y: [*_MNLI_ID, a, b, *[y] * 6])},
    "qnli": _both("index\tquestion\tsentence\tlabel", lambda a, b, y: ["0", a, b, y]),
    "rte": _both("index\tsentence1\tsentence2\tlabel", lambda a, b, y: ["0", a, b, y]),
    "wnli": _both("index\tsentence1\tsentence2\tlabel", lambda a, b, y: ["0", a, b, y]),
}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def _zip(files, stored=False):
    """Bytes of a zip holding {member name: text}."""
    import io
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buffer.getvalue()


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves {path: (body, Content-Length to announce)}; anything else is a 404."""
    files = {}

    def do_GET(self):
        if self.path not in self.files:
            self.send_error(404)
            return
        body, length = self.files[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True  # a body shorter than announced ends with the connection

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A real HTTP server on 127.0.0.1 in a thread: (base URL, {path: (body, Content-Length)})."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    files = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Files,), {"files": files}))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)  # poll: quick shutdown
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", files
    finally:
        httpd.shutdown()
        httpd.server_close()


def _glue_dir():
    if not os.environ.get("GLUE_DIR"):
        pytest.skip("set GLUE_DIR to the glue_data folder to test on the real files")
    return Path(os.environ["GLUE_DIR"])


def _real_split(name, split):
    task = data.get_task(name)
    if not (_glue_dir() / task.dir / dict(task.files)[split]).is_file():
        pytest.skip(f"{task.dir} {split} not in $GLUE_DIR")
    return data.read_split(task, split)


def _glue_fixture(root, n_train=96, n_dev=32, seed=0):
    """CoLA (no header: source, label, mark, sentence) and STS-B (sentence pairs, a score) in GLUE
    format, with a learnable rule: the first word, "good" or "bad", gives the label (score 4.5 or 0.5)."""
    g = torch.Generator().manual_seed(seed)
    words = "the a cat dog sees runs big small red old new bird tree".split()
    header, stsb_row = _FORMATS["sts-b"]["train.tsv"]
    for split, n in (("train", n_train), ("dev", n_dev)):
        cola, stsb = [], [header]
        for i in range(n):
            body = [words[j] for j in torch.randint(0, len(words), (5,), generator=g)]
            body[int(torch.randint(0, 5, (1,), generator=g))] = "good" if i % 2 else "bad"
            body = (["good"] if i % 2 else ["bad"]) + body
            cola.append(f"src\t{i % 2}\t{'' if i % 2 else '*'}\t{' '.join(body)} .")
            stsb.append("\t".join(stsb_row(" ".join(body), " ".join(body[1:]), "4.500" if i % 2 else "0.500")))
        _write(root / "CoLA" / f"{split}.tsv", "\n".join(cola) + "\n")
        _write(root / "STS-B" / f"{split}.tsv", "\n".join(stsb) + "\n")
    return root


def _train(tmp_path, *flags, out="run"):
    args = ["--task", "cola", "--data_dir", str(tmp_path / "glue"), "--epochs", "2", "--batch_size", "8",
            "--calib_batches", "2", "--calib_batch_size", "8", "--lr", "1e-2", "--out", str(tmp_path / out),
            "--log_every", "1000", *flags]
    train.main(args)
    return _metrics(tmp_path / out)


def _metrics(run, kind="eval"):
    return [row for row in train.read_metrics(run) if row["kind"] == kind]


def _pretrained_checkpoint(path, glue):
    """A tiny random BERT checkpoint in Hugging Face format, written without transformers (our Encoder by
    _save_ours_as_hf), dropout 0, a 2-class head, and a WordPiece vocabulary of the fixture's words.
    Returns the model it holds."""
    with warnings.catch_warnings():  # the fixture holds a few rows, not GLUE's count
        warnings.simplefilter("ignore", data.RowCountWarning)
        tokenizer = data.build_tokenizer([e.text_a for e in data.read_split("cola", "train", glue)])
    c = _small_config("bert", num_labels=2)
    c.dropout = 0.0
    assert tokenizer.vocab_size <= c.vocab_size
    torch.manual_seed(0)
    source = _perturb(Encoder(c)).eval()
    _save_ours_as_hf(source, path, "safetensors")
    tokenizer.save(path)
    return source


@pytest.fixture
def glue(tmp_path):
    return _glue_fixture(tmp_path / "glue")


def _results_sandbox(tmp_path, monkeypatch, block):
    """results/ in tmp_path: a README.md whose `block` is STALE, and every results/ file reading and
    writing there. Returns the folder."""
    from results import common
    here = tmp_path / "results"
    here.mkdir()
    (here / "README.md").write_text(f"head\n<!-- {block} -->\nSTALE\n<!-- /{block} -->\ntail\n")
    monkeypatch.setattr(common, "HERE", here)
    return here
