"""Tests of data.py: GLUE tasks and readers, downloads, tokenizers (id-parity with Hugging Face),
batches and metrics."""
import ast
import dataclasses
import math
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from cglora import balance
from data import Example
from conftest import _FORMATS, _HERE, _glue_dir, _real_split, _write, _zip


# The GLUE fixtures here hold a few rows, not GLUE's counts: read_split's RowCountWarning is expected
# (pytest.warns still sees it where a test checks it).
pytestmark = pytest.mark.filterwarnings("ignore::data.RowCountWarning")


_TOKENIZERS = os.environ.get("TOKENIZERS_DIR")  # holds roberta-base/ and all-minilm-l6-v2/


_HF = {"roberta": ("roberta-base", "RobertaTokenizerFast"), "bert": ("all-minilm-l6-v2", "BertTokenizerFast")}  # Rust-backed


# ---------------------------------------------------------------------------------------------
# Tasks and readers


_A = "it 's a charming and often affecting journey . "  # SST-2 style: tokenized, trailing space


_B = '" The foodservice pie business does not fit our strategy .'  # quotes: no quote handling allowed


_C = 'He said "hi" to them.'


_D = "Who went?"


# raw label in the file -> label read_split must return, for the two rows of each file
_LABELS = {
    "cola": [("1", 1), ("0", 0)], "sst-2": [("0", 0), ("1", 1)], "mrpc": [("1", 1), ("0", 0)],
    "qqp": [("0", 0), ("1", 1)], "sts-b": [("3.800", 3.8), ("0.000", 0.0)],
    "mnli": [("neutral", 2), ("contradiction", 0)], "qnli": [("not_entailment", 1), ("entailment", 0)],
    "rte": [("entailment", 0), ("not_entailment", 1)], "wnli": [("1", 1), ("0", 0)],
}


_SINGLE = ("cola", "sst-2")  # single-sentence tasks


_SPLIT_OF = {"train.tsv": "train", "dev.tsv": "dev", "dev_matched.tsv": "dev", "dev_mismatched.tsv": "dev_mismatched"}


def _write_task(root, name):
    """Write a two-row GLUE-format fixture for every file of `name`; return {split: expected examples}."""
    task = data.get_task(name)
    pair = name not in _SINGLE
    texts = [(_A, _B if pair else None), (_C, _D if pair else None)]
    for file, (header, row) in _FORMATS[name].items():
        rows = ["\t".join(row(a, b, raw)) for (a, b), (raw, _) in zip(texts, _LABELS[name])]
        end = "" if file.startswith("dev") else "\n"  # dev files without a final newline, as CoLA's
        _write(root / task.dir / file, "\n".join(([header] if header else []) + rows) + end)
    expected = [Example(a, b, label) for (a, b), (_, label) in zip(texts, _LABELS[name])]
    return {_SPLIT_OF[file]: expected for file in _FORMATS[name]}


@pytest.mark.parametrize("name", list(_FORMATS))
def test_read_split_every_task_on_a_glue_format_fixture(tmp_path, name):
    expected = _write_task(tmp_path, name)
    task = data.get_task(name)
    assert set(expected) == {split for split, _ in task.files}
    for split, examples in expected.items():
        got = data.read_split(task, split, tmp_path)
        assert got == examples, (name, split)
        assert all(type(e.label) is (float if name == "sts-b" else int) for e in got)


def test_get_task_names_aliases_and_metadata():
    for alias in ["cola", "CoLA", "COLA"]:
        assert data.get_task(alias).name == "cola"
    for alias in ["sts-b", "stsb", "STS-B", "sts_b"]:
        assert data.get_task(alias).name == "sts-b"
    assert data.get_task("sst2").dir == "SST-2" and data.get_task("Mnli").dir == "MNLI"
    num_labels = {"cola": 2, "sst-2": 2, "mrpc": 2, "qqp": 2, "sts-b": 1, "mnli": 3, "qnli": 2, "rte": 2, "wnli": 2}
    assert {n: data.get_task(n).num_labels for n in num_labels} == num_labels
    metrics = {"cola": {"mcc"}, "sst-2": {"accuracy"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"},
               "sts-b": {"pearson", "spearman"}, "mnli": {"accuracy"}, "qnli": {"accuracy"}, "rte": {"accuracy"},
               "wnli": {"accuracy"}}
    for n, m in metrics.items():
        task = data.get_task(n)
        assert set(task.metrics) == m and task.main_metric in m
    assert data.get_task("cola").main_metric == "mcc" and data.get_task("sts-b").main_metric == "pearson"
    assert [split for split, _ in data.get_task("mnli").files] == ["train", "dev", "dev_mismatched"]
    with pytest.raises(ValueError) as err:
        data.get_task("squad")
    assert "'squad'" in str(err.value) and all(n in str(err.value) for n in num_labels)


def test_resolve_data_dir_order(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/env/glue")
    assert data.resolve_data_dir("/flag/glue") == Path("/flag/glue")
    assert data.resolve_data_dir() == Path("/env/glue")
    monkeypatch.delenv("GLUE_DIR")
    assert data.resolve_data_dir() == Path("glue_data")


def test_read_split_uses_glue_dir(tmp_path, monkeypatch):
    expected = _write_task(tmp_path, "rte")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert data.read_split(data.get_task("rte"), "dev") == expected["dev"]


def test_read_split_bad_input(tmp_path):
    rte, stsb = data.get_task("rte"), data.get_task("sts-b")
    header = "index\tsentence1\tsentence2\tlabel\n"
    path = _write(tmp_path / "RTE" / "train.tsv", header + "0\ta\tb\tentailment\n1\ta b\tnot_entailment\n")
    _write(tmp_path / "RTE" / "dev.tsv", header + "0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=rf"{path}:3: expected 4 tab-separated fields .*found 3"):
        data.read_split(rte, "train", tmp_path)
    with pytest.raises(ValueError, match=r"dev.tsv:2: unknown label 'maybe'.*entailment, not_entailment"):
        data.read_split(rte, "dev", tmp_path)
    _write(path, "")
    with pytest.raises(ValueError, match=rf"{path} is empty"):
        data.read_split(rte, "train", tmp_path)
    _write(path, header)
    with pytest.raises(ValueError, match="no data rows"):
        data.read_split(rte, "train", tmp_path)
    _write(path, "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"train.tsv:1: header .* lacks column"):
        data.read_split(rte, "train", tmp_path)
    _write(tmp_path / "STS-B" / "train.tsv", "\t".join(f"c{i}" for i in range(7)) + "\tsentence1\tsentence2\tscore\n"
           + "\t".join(["x"] * 9) + "\thigh\n")
    with pytest.raises(ValueError, match=r"STS-B/train.tsv:2: expected a numeric score, found 'high'"):
        data.read_split(stsb, "train", tmp_path)
    with pytest.raises(ValueError, match="dev_mismatched"):
        data.read_split(rte, "dev_mismatched", tmp_path)


def test_read_split_warns_of_a_row_count_not_glues_and_refuses_a_cut_last_line(tmp_path):
    rte = data.get_task("rte")
    header = "index\tsentence1\tsentence2\tlabel\n"
    path = _write(tmp_path / "RTE" / "train.tsv", header + "0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n")
    with pytest.warns(data.RowCountWarning, match=rf"{path} has 2 rows where GLUE's has 2490: a truncated or edited "
                                                  rf"copy\? For GLUE's own, delete {tmp_path / 'RTE'} and run again"):
        assert len(data.read_split(rte, "train", tmp_path)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GLUE's count: no warning
        data.read_split(dataclasses.replace(rte, rows=(2, 277)), "train", tmp_path)
    _write(path, header + "0\ta\tb\tentailment\n1\tc d")  # cut mid-row: no line end, 2 of 4 fields
    with pytest.raises(ValueError, match=rf"{path}:3: the last line has 2 of 4 tab-separated fields and no line "
                                         rf"end: the file is cut short. Restore it whole \(delete {tmp_path / 'RTE'}"):
        data.read_split(rte, "train", tmp_path)


def test_real_cola_cut_mid_sentence_warns_that_it_was_cut(tmp_path):
    """Cut at byte 200,000 the last line still has its four fields: the count and the missing line end
    tell; the same rows ended by a line end (a copy shortened on purpose) warn of the count alone."""
    source = _glue_dir() / "CoLA" / "train.tsv"
    if not source.is_file():
        pytest.skip("CoLA train not in $GLUE_DIR")
    (tmp_path / "CoLA").mkdir()
    cut = source.read_bytes()[:200_000]
    for tail, said in ((b"", " and its last line has no line end: it was cut short"), (b"\n", ": a truncated or edited")):
        (tmp_path / "CoLA" / "train.tsv").write_bytes(cut + tail)
        with pytest.warns(data.RowCountWarning, match=f"has 3875 rows where GLUE's has 8551{said}"):
            data.read_split("cola", "train", tmp_path)


def test_read_split_and_compute_metrics_take_a_task_or_its_name(tmp_path):
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.RowCountWarning)
        assert data.read_split("RTE", "dev", tmp_path) == data.read_split(data.get_task("rte"), "dev", tmp_path)
    assert data.compute_metrics("sts-b", [1, 2, 3], [1, 2, 4]) == \
        data.compute_metrics(data.get_task("stsb"), [1, 2, 3], [1, 2, 4])
    with pytest.raises(ValueError, match="unknown GLUE task 'nosuch'; known tasks: cola, sst-2"):
        data.compute_metrics("nosuch", [1], [1])


def test_missing_files_name_every_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.read_split(data.get_task("mnli"), "train", tmp_path)
    message = str(err.value)
    for file in ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"]:
        assert str(tmp_path / "MNLI" / file) in message
    assert "--data_dir" in message and "$GLUE_DIR" in message and "download_task" in message


def _task_zip(tmp_path, name, **kwargs):
    """(GLUE archive bytes of a fixture task, the examples read_split must return, the task with the
    fixture's row counts in place of GLUE's)."""
    expected = _write_task(tmp_path / "source", name)
    task = data.get_task(name)
    files = {f"{task.dir}/{f}": (tmp_path / "source" / task.dir / f).read_text() for _, f in task.files}
    rows = tuple(len(expected[split]) for split, _ in task.files)
    return _zip(files, **kwargs), expected, dataclasses.replace(task, rows=rows)


def test_download_task_over_http(tmp_path, server):
    base, files = server
    archive, expected, task = _task_zip(tmp_path, "rte")
    files["/RTE.zip"] = (archive, len(archive))
    target, lines = tmp_path / "glue_data", []
    assert data.download_task(task, target, base, log=lines.append) == target / "RTE"
    assert data.read_split(task, "train", target) == expected["train"]
    assert data.read_split(task, "dev", target) == expected["dev"]
    assert os.listdir(target) == ["RTE"]  # the archive and the temporary folder are gone
    assert lines[0] == f"RTE is not in {target}: downloading it"
    assert lines[1] == f"downloading {base}/RTE.zip ({len(archive) / 1e6:.1f} MB)" and "checked" in lines[-1]
    assert data.download_task(task, target, base + "/elsewhere") == target / "RTE"  # complete: left as it is


def _fails(task, target, base, *messages):
    with pytest.raises(data.DownloadError) as err:
        data.download_task(task, target, base, log=lambda *a: None)
    message = str(err.value)
    assert all(m in message for m in messages), message
    assert "\n" not in message and "To get" in message  # one line that says how to get the task by hand
    assert f"--data_dir DIR (or GLUE_DIR=DIR) with DIR/{task.dir}/train.tsv" in message  # or use files here
    assert not target.exists() or os.listdir(target) == []  # no task folder, no temporary files
    return message


@pytest.mark.parametrize("fault,message", [
    ("404", "HTTP Error 404"),
    ("cut connection", "cut short"),  # the server announces more bytes than it sends
    ("truncated zip", "not a readable zip"),  # a short file, served whole
    ("corrupt zip", "fails its CRC check"),
    ("no dev.tsv", "lacks RTE/dev.tsv"),
    ("wrong row count", "has 2 rows where GLUE's has 3"),
])
def test_download_task_failures_leave_nothing(tmp_path, server, fault, message):
    base, files = server
    archive, _, task = _task_zip(tmp_path, "rte", stored=True)
    body, length = archive, len(archive)
    if fault == "cut connection":
        body = archive[:len(archive) // 2]
    elif fault == "truncated zip":
        body = archive[:len(archive) // 2]
        length = len(body)
    elif fault == "corrupt zip":
        at = archive.index(b"entailment")  # inside a stored member's data: only its CRC can tell
        body = archive[:at] + b"E" + archive[at + 1:]
    elif fault == "no dev.tsv":
        body = _zip({"RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"})
        length = len(body)
    elif fault == "wrong row count":
        task = dataclasses.replace(task, rows=(3, 2))
    if fault != "404":
        files["/RTE.zip"] = (body, length)
    _fails(task, tmp_path / "glue_data", base, message, f"{base}/RTE.zip", str(tmp_path / "glue_data"))


def test_download_interrupted_while_unpacking_leaves_nothing(tmp_path, server, monkeypatch):
    base, files = server
    archive, expected, task = _task_zip(tmp_path, "rte")
    files["/RTE.zip"] = (archive, len(archive))
    target, extract = tmp_path / "glue_data", zipfile.ZipFile.extract
    calls = []

    def fail_second(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", fail_second)
    _fails(task, target, base, "No space left on device")
    assert data.missing_files(task, target)  # a later run still sees the task as missing
    monkeypatch.setattr(zipfile.ZipFile, "extract", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        data.download_task(task, target, base, log=lambda *a: None)
    assert not target.exists()  # the data dir this download made goes too
    monkeypatch.setattr(zipfile.ZipFile, "extract", extract)
    data.download_task(task, target, base, log=lambda *a: None)  # and a later download starts afresh
    assert data.read_split(task, "dev", target) == expected["dev"]


def test_download_refuses_an_incomplete_task_folder(tmp_path, server):
    base, _ = server
    _write(tmp_path / "glue_data" / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(data.DownloadError, match=r"RTE exists but lacks dev.tsv: complete it or remove it"):
        data.download_task(data.get_task("rte"), tmp_path / "glue_data", base)
    assert os.listdir(tmp_path / "glue_data" / "RTE") == ["train.tsv"]


def test_download_mrpc_splits_microsofts_file_as_glue_does(tmp_path, server):
    base, files = server
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
    pairs = [("1", "11", "12", "A cat .", "A cat sat ."), ("0", "21", "22", "Rain .", "Sun ."),
             ("1", "31", "32", "He ran .", "He ran off ."), ("0", "41", "42", "Yes .", "No .")]
    source = header + "".join("\t".join(p) + " \r\n" for p in pairs)  # CRLF and a trailing space, stripped
    for name, text in {"msr_paraphrase_train.txt": source, "mrpc_dev_ids.tsv": "21\t22\r\n41\t42\r\n"}.items():
        files[f"/{name}"] = (text.encode("utf-8"), len(text.encode("utf-8")))
    task = dataclasses.replace(data.get_task("mrpc"), rows=(2, 2))
    target = tmp_path / "glue_data"
    data.download_task(task, target, base, log=lambda *a: None)
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    expected = {"train": [pairs[0], pairs[2]], "dev": [pairs[1], pairs[3]]}
    for split, rows in expected.items():
        assert (target / "MRPC" / f"{split}.tsv").read_bytes() == (head + "".join(
            "\t".join(p) + "\n" for p in rows)).encode("utf-8")
        assert [e.label for e in data.read_split(task, split, target)] == [int(p[0]) for p in rows]
    assert sorted(os.listdir(target)) == ["MRPC"] and (target / "MRPC" / "dev_ids.tsv").is_file()
    message = _fails(task, tmp_path / "other", base + "/missing", "HTTP Error 404", "mrpc_dev_ids.tsv")
    assert "download_glue_data.py" in message


def test_task_sources_official_or_mirror(monkeypatch):
    cola, mrpc = data.get_task("cola"), data.get_task("mrpc")
    monkeypatch.delenv("GLUE_URL")
    assert data.task_sources(cola) == {"CoLA.zip": "https://dl.fbaipublicfiles.com/glue/data/CoLA.zip"}
    assert set(data.task_sources(mrpc).values()) == set(data.MRPC_SOURCES.values())
    assert data.task_sources(data.get_task("qnli"))["QNLIv2.zip"].endswith("/glue/data/QNLIv2.zip")
    monkeypatch.setenv("GLUE_URL", "http://mirror/glue/")
    assert data.task_sources(cola) == {"CoLA.zip": "http://mirror/glue/CoLA.zip"}
    assert data.task_sources(mrpc) == {n: f"http://mirror/glue/{n}" for n in data.MRPC_SOURCES}
    assert data.task_sources(cola, "file:///srv/glue") == {"CoLA.zip": "file:///srv/glue/CoLA.zip"}


def test_download_task_from_a_file_url(tmp_path):
    archive, expected, task = _task_zip(tmp_path, "sts-b")
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "STS-B.zip").write_bytes(archive)
    target = tmp_path / "glue_data"
    data.download_task(task, target, (tmp_path / "mirror").as_uri(), log=lambda *a: None)
    assert data.read_split(task, "train", target) == expected["train"]


# rows and, where known, the count of label 1 (STS-B: mean score)
_REAL = [("cola", "train", 8551, 6023), ("cola", "dev", 1043, 721), ("sst-2", "train", 67349, 37569),
         ("sst-2", "dev", 872, 444), ("mrpc", "train", 3668, 2474), ("mrpc", "dev", 408, 279),
         ("qqp", "train", 363846, None), ("qqp", "dev", 40430, None), ("sts-b", "train", 5749, 2.70),
         ("sts-b", "dev", 1500, 2.36), ("mnli", "train", 392702, None), ("mnli", "dev", 9815, None),
         ("mnli", "dev_mismatched", 9832, None), ("qnli", "train", 104743, None), ("qnli", "dev", 5463, 2761),
         ("rte", "train", 2490, 1241), ("rte", "dev", 277, 131), ("wnli", "train", 635, None),
         ("wnli", "dev", 71, None)]


@pytest.mark.parametrize("name,split,rows,balance", _REAL)
def test_real_glue_files(name, split, rows, balance):
    examples = _real_split(name, split)
    assert len(examples) == rows
    labels = [e.label for e in examples]
    if name == "sts-b":
        assert round(sum(labels) / rows, 2) == balance and min(labels) >= 0 and max(labels) <= 5
    elif balance is not None:
        assert sum(y == 1 for y in labels) == balance
    pair = name not in _SINGLE
    assert all(isinstance(e.text_a, str) and e.text_a and (e.text_b is not None) == pair for e in examples)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _tokenizer_dir(kind):
    if not _TOKENIZERS:
        pytest.skip("set TOKENIZERS_DIR to test on real tokenizer files")
    folder = Path(_TOKENIZERS) / _HF[kind][0]
    if not folder.is_dir():
        pytest.skip(f"no tokenizer files at {folder}")
    return folder


@pytest.fixture(scope="module", params=list(_HF))
def parity_pair(request):
    """(kind, ours, Hugging Face's) for the real RoBERTa BPE and BERT uncased WordPiece files."""
    transformers = pytest.importorskip("transformers")
    folder = _tokenizer_dir(request.param)
    hf = getattr(transformers, _HF[request.param][1]).from_pretrained(str(folder))
    return request.param, data.load_tokenizer(folder), hf


def _mismatches(kind, ours, hf, texts, pairs=None, max_len=None):
    """Rows where our ids (and BERT token type ids) differ from Hugging Face's tokenizer(texts, pairs)."""
    kwargs = {"truncation": True, "max_length": max_len} if max_len else {}
    ref = hf(texts, pairs, **kwargs) if pairs else hf(texts, **kwargs)
    bad = []
    for i, text in enumerate(texts):
        ids, types = ours.encode_pair(text, pairs[i] if pairs else None, max_len)
        ref_types = ref["token_type_ids"][i] if kind == "bert" else [0] * len(ref["input_ids"][i])
        if ids != ref["input_ids"][i] or types != ref_types or ids != ours.encode(text, pairs and pairs[i], max_len):
            bad.append((text, pairs and pairs[i], max_len, ids, ref["input_ids"][i]))
    return bad


_TRICKY = [
    "Hello world", " Hello  world ", "", " ", "a\tb\nc\r\nd \n\n e  ", "He's I'M we'll they'd 'S 'tis",
    "naïve café résumé Ångström", "ΟΔΟΣ σοφός", "İstanbul DİYARBAKIR", "Ｈｅｌｌｏ，世界！", "日本語の文章です。한국어",
    "中文字符和English混合", "$5+3=8 | a^b ~c `d` <e> @f #g", "1,000.50 ٣٤ Ⅻ x² ½ 〇一二三", "ǅ ʰ ᵃ ﬁ",
    "\u00a0nbsp\u2009thin\u3000ideo\u2028line\u0085nel", "ctrl\x00\x1c\x1f\x7f\ufffd\u200bzw",
    "e\u0301 \u0301 क्षत्रिय",
    "emoji 😀 👩‍👩‍👧 🇫🇷!!", "…—–“quotes” «guillemets» ‘single’", "\u1fef`grave", "a" * 101, "b" * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "<s>x</s> <mask> y <pad><unk>",
    "[CLS] a [SEP] b [UNK] [MASK] [PAD] [cls]", "https://example.com/a_b?c=d&e=f", "don't can't won't ain't",
]


def test_tokenizer_parity_on_tricky_strings(parity_pair):
    kind, ours, hf = parity_pair
    texts = [t for t in _TRICKY if t]  # Hugging Face refuses an empty batch item
    assert _mismatches(kind, ours, hf, texts) == []
    assert _mismatches(kind, ours, hf, texts, texts[1:] + texts[:1]) == []
    for max_len in (5, 8, 11):
        assert _mismatches(kind, ours, hf, texts, texts[::-1], max_len) == []
    assert ours.encode("") == hf("")["input_ids"]
    assert ours.encode("a b", "") == hf("a b", "")["input_ids"]  # an empty pair is no pair, as in HF


@pytest.mark.parametrize("name", ["cola", "sst-2", "mrpc", "sts-b", "rte"])
def test_tokenizer_parity_on_real_dev_sets(parity_pair, name):
    """Every sentence of the dev set alone, every pair, and pairs cut by longest-first: 100% identical ids."""
    kind, ours, hf = parity_pair
    examples = _real_split(name, "dev")
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples if e.text_b is not None]
    compared, bad = 0, []
    for texts in (a, b):
        if texts:
            bad += _mismatches(kind, ours, hf, texts) + _mismatches(kind, ours, hf, texts, max_len=8)
            compared += 2 * len(texts)
    if b:
        for max_len in (None, 16, 17, 40):  # odd and even budgets; 40 cuts RTE premises, not hypotheses
            bad += _mismatches(kind, ours, hf, a, b, max_len)
            compared += len(a)
        assert any(len(ours.encode(x, y, 17)) == 17 for x, y in zip(a, b))  # truncation did happen
    print(f"{kind} {name}: {compared} encodings compared, {len(bad)} mismatches")
    assert not bad, bad[:3]


def test_roberta_known_ids_and_pair_layout():
    tok = data.load_tokenizer(_tokenizer_dir("roberta"))
    assert isinstance(tok, data.BPETokenizer)
    assert tok.encode("Hello world") == [0, 31414, 232, 2]
    ids, types = tok.encode_pair("Hello world", "Hello world")
    assert ids == [0, 31414, 232, 2, 2, 31414, 232, 2] and types == [0] * 8  # <s> A </s></s> B </s>
    assert tok.encode("Hello world", max_len=3) == [0, 31414, 2]
    assert (tok.pad_id, tok.vocab_size) == (1, 50265)  # <mask> = 50264


def test_bert_known_ids_and_token_types():
    tok = data.load_tokenizer(_tokenizer_dir("bert"))
    assert isinstance(tok, data.WordPieceTokenizer) and tok.lower
    ids, types = tok.encode_pair("Hello, WORLD!", "Héllo")
    assert ids == [101, 7592, 1010, 2088, 999, 102, 7592, 102]  # [CLS] hello , world ! [SEP] hello [SEP]
    assert types == [0, 0, 0, 0, 0, 0, 1, 1]
    assert (tok.pad_id, tok.vocab_size) == (0, 30522)
    assert tok.encode("a" * 101) == [101, 100, 102]  # over 100 characters: [UNK]


def test_truncate_longest_first():
    a, b = list(range(10)), list(range(100, 103))
    assert data.truncate(a, b, 13) == (a, b)  # fits: untouched
    assert data.truncate(a, b, 8) == (a[:5], b)  # only the longer one is cut
    assert data.truncate(a, b, 5) == (a[:3], b[:2])  # both cut: the shorter keeps room // 2
    assert data.truncate(b, a, 5) == (b[:2], a[:3])
    assert data.truncate(a[:4], a[:4], 5) == (a[:2], a[:3])  # tie: A keeps room // 2
    assert data.truncate(a, None, 4) == (a[:4], None)


def test_simple_tokenizer_for_the_tiny_encoder(tmp_path):
    tok = data.build_tokenizer(["The cat sat.", "the cat ran!"])
    # specials first, then words by count, ties alphabetical: cat the ! . ran sat
    assert [t for t, _ in sorted(tok.vocab.items(), key=lambda kv: kv[1])] == \
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "cat", "the", "!", ".", "ran", "sat"]
    assert tok.pad_id == 0 and tok.vocab_size == 10
    assert tok.encode("The dog sat.") == [2, 5, 1, 9, 7, 3]
    assert tok.encode_pair("cat", "catty") == ([2, 4, 3, 1, 3], [0, 0, 0, 1, 1])  # whole words only
    assert tok.encode("the cat sat on", max_len=4) == [2, 5, 4, 3]
    assert data.build_tokenizer(["The cat sat.", "the cat ran!"], min_freq=2).vocab_size == 6
    assert data.build_tokenizer(["The cat sat.", "the cat ran!"], max_size=5).vocab_size == 5
    tok.save(tmp_path / "run")
    back = data.load_tokenizer(tmp_path / "run")
    assert back.vocab == tok.vocab and back.pad_id == 0
    for text in ["The dog sat.", "Ran, cat!"]:
        assert back.encode_pair(text, text) == tok.encode_pair(text, text)


@pytest.mark.parametrize("kind", list(_HF))
def test_pretrained_tokenizers_round_trip_through_save(tmp_path, kind):
    tok = data.load_tokenizer(_tokenizer_dir(kind))
    tok.save(tmp_path)
    back = data.load_tokenizer(tmp_path)
    assert type(back) is type(tok) and back.vocab == tok.vocab and back.vocab_size == tok.vocab_size
    assert getattr(back, "merges", None) == getattr(tok, "merges", None)
    for text in _TRICKY:
        assert back.encode(text, text[::-1], 24) == tok.encode(text, text[::-1], 24)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab.json.*merges.txt.*vocab.txt"):
        data.load_tokenizer(tmp_path)
    _write(tmp_path / "vocab.txt", "[PAD]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['\[CLS\]', '\[SEP\]', '\[UNK\]'\]"):
        data.load_tokenizer(tmp_path)


def test_encode_examples_truncates_and_keeps_labels():
    tok = data.build_tokenizer(["a b c d e f"])
    encoded = data.encode_examples([Example("a b c d e", "f", 1), Example("a", None, 2.5)], tok, max_len=6)
    assert encoded[0] == (tok.encode("a b", "f"), [0, 0, 0, 0, 1, 1], 1)
    assert encoded[1] == ([2, tok.vocab["a"], 3], [0, 0, 0], 2.5)


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_dynamic_padding_and_masks():
    lengths = [3, 5, 2, 4, 1]
    encoded = [(list(range(10, 10 + n)), [0] * (n - 1) + [1], i) for i, n in enumerate(lengths)]
    out = list(data.batches(encoded, batch_size=2, pad_id=7))
    assert [tuple(b["input_ids"].shape) for b in out] == [(2, 5), (2, 4), (1, 1)]
    first = out[0]
    assert first["input_ids"].tolist() == [[10, 11, 12, 7, 7], [10, 11, 12, 13, 14]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert first["token_type_ids"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    assert first["labels"].tolist() == [0, 1]
    for b in out:
        assert all(b[k].dtype == torch.long for k in ("input_ids", "attention_mask", "token_type_ids", "labels"))
        assert (b["input_ids"][b["attention_mask"] == 0] == 7).all()
    regression = list(data.batches([([1, 2], [0, 0], 3.8), ([1], [0], 0.5)], 4, pad_id=0))
    labels = regression[0]["labels"]
    assert labels.dtype == torch.float32 and labels.tolist() == pytest.approx([3.8, 0.5])


def test_batches_shuffle_is_deterministic_by_seed():
    encoded = [([1] * (1 + i % 5), [0] * (1 + i % 5), i) for i in range(20)]

    def order(**kw):
        return [y for b in data.batches(encoded, 3, 0, **kw) for y in b["labels"].tolist()]

    assert order() == list(range(20))
    assert order(shuffle=True, seed=0) == order(shuffle=True, seed=0) != list(range(20))
    assert order(shuffle=True, seed=1) != order(shuffle=True, seed=0)
    assert sorted(order(shuffle=True, seed=1)) == list(range(20))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_against_hand_computed_values():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    assert data.compute_metrics(data.get_task("cola"), pred, gold) == pytest.approx({"mcc": 1 / 6})
    assert data.compute_metrics(data.get_task("mrpc"), pred, gold) == pytest.approx({"f1": 2 / 3, "accuracy": 0.6})
    assert list(data.compute_metrics(data.get_task("qqp"), pred, gold)) == list(data.get_task("qqp").metrics)
    assert data.compute_metrics(data.get_task("mnli"), [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    assert data.compute_metrics(data.get_task("rte"), torch.tensor([0, 1]), torch.tensor([1, 1])) == {"accuracy": 0.5}
    stsb = data.get_task("sts-b")
    # deviations [-1, 0, 1] and [-1, 1, 0]: covariance 1, variances 2 and 2
    assert data.compute_metrics(stsb, [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == \
        pytest.approx({"pearson": 0.5, "spearman": 0.5})
    # ties take average ranks: [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    tied = data.compute_metrics(stsb, [1.0, 5.0, 5.0, 9.0], [0.1, 0.2, 0.3, 0.4])
    assert tied["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    monotone = data.compute_metrics(stsb, [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 100.0])
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.9


def test_metrics_degenerate_cases_are_zero_not_nan():
    assert data.compute_metrics(data.get_task("cola"), [1, 1, 1, 1], [1, 0, 1, 0]) == {"mcc": 0.0}
    assert data.compute_metrics(data.get_task("cola"), [1, 0, 1, 0], [1, 1, 1, 1]) == {"mcc": 0.0}
    assert data.compute_metrics(data.get_task("mrpc"), [0, 0], [0, 0]) == {"f1": 0.0, "accuracy": 1.0}
    assert data.compute_metrics(data.get_task("sts-b"), [0.1] * 7, [0, 1, 2, 3, 4, 5, 5]) == \
        {"pearson": 0.0, "spearman": 0.0}
    with pytest.raises(ValueError, match="as many predictions as labels"):
        data.compute_metrics(data.get_task("rte"), [0, 1], [0])


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.integers(0, 6, size=200).astype(float)  # y has many ties
    got = data.compute_metrics(data.get_task("sts-b"), x, y)
    assert got["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])


# ---------------------------------------------------------------------------------------------
# The module itself


def test_data_py_depends_on_stdlib_numpy_torch_only():
    tree = ast.parse((_HERE / "data.py").read_text(encoding="utf-8"))
    nodes = list(ast.walk(tree))
    roots = {a.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for a in node.names}
    roots |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom)}
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "torch"}, roots
