"""GLUE data for CG-LoRA, in reading order: the nine tasks' TSV files -> tokenizers with Hugging
Face id-parity (RoBERTa byte-level BPE, BERT WordPiece, whole words for the tiny encoder) -> padded
batches -> the official metrics. Standard library, numpy and torch only."""
import functools
import http.client
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# --- Tasks: the standard glue_data/<Task>/ layout written by GLUE's download_glue_data.py ---------

# official per-task archives; $GLUE_URL: a mirror
GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
# GLUE ships no MRPC archive (licence): its download_glue_data.py splits Microsoft's training
# file, as SentEval hosts it, into train and dev by GLUE's list of dev pairs. A $GLUE_URL mirror
# holds these two names instead.
MRPC_SOURCES = {
    "msr_paraphrase_train.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/"
                                "msr_paraphrase_train.txt",
    "mrpc_dev_ids.tsv": "https://firebasestorage.googleapis.com/v0/b/"
                        "mtl-sentence-representations.appspot.com/o/"
                        "data%2Fmrpc_dev_ids.tsv?alt=media&"
                        "token=ec5c0836-31d5-48f4-b431-7480817f1adc",
}


class Example(NamedTuple):
    text_a: str
    text_b: str | None  # None for single-sentence tasks (CoLA, SST-2)
    label: int | float  # class id, or the similarity score for STS-B


@dataclass(frozen=True)
class Task:
    name: str  # canonical, lower-case: "cola", "sts-b"
    dir: str  # folder under the data dir: "CoLA", "STS-B"
    columns: tuple  # header names of (text_a, text_b or None, label)
    labels: tuple  # raw label strings in class-id order; () = regression (STS-B)
    metrics: tuple  # keys of compute_metrics; the first is the main one
    zip: str | None  # archive under GLUE_URL; None: GLUE builds MRPC from Microsoft's files instead
    files: tuple = (("train", "train.tsv"), ("dev", "dev.tsv"))  # split -> file; test is unlabeled
    header: tuple | None = None  # column names when the files have no header line (CoLA)
    # data rows of each of `files` as GLUE ships them: a download is checked against them
    rows: tuple = ()

    @property
    def num_labels(self):  # 1 = regression
        return len(self.labels) or 1

    @property
    def main_metric(self):
        return self.metrics[0]


_NLI = ("entailment", "not_entailment")
_TASKS = [
    Task("cola", "CoLA", ("sentence", None, "label"), ("0", "1"), ("mcc",), "CoLA.zip",
         header=("source", "label", "mark", "sentence"), rows=(8551, 1043)),
    Task("sst-2", "SST-2", ("sentence", None, "label"), ("0", "1"), ("accuracy",), "SST-2.zip",
         rows=(67349, 872)),
    Task("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), ("0", "1"), ("f1", "accuracy"),
         None,
         rows=(3668, 408)),
    Task("qqp", "QQP", ("question1", "question2", "is_duplicate"), ("0", "1"), ("f1", "accuracy"),
         "QQP-clean.zip", rows=(363846, 40430)),
    Task("sts-b", "STS-B", ("sentence1", "sentence2", "score"), (), ("pearson", "spearman"),
         "STS-B.zip",
         rows=(5749, 1500)),
    Task("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"),
         ("contradiction", "entailment", "neutral"), ("accuracy",), "MNLI.zip",
         files=(("train", "train.tsv"), ("dev", "dev_matched.tsv"),
                ("dev_mismatched", "dev_mismatched.tsv")),
         rows=(392702, 9815, 9832)),
    Task("qnli", "QNLI", ("question", "sentence", "label"), _NLI, ("accuracy",), "QNLIv2.zip",
         rows=(104743, 5463)),
    Task("rte", "RTE", ("sentence1", "sentence2", "label"), _NLI, ("accuracy",), "RTE.zip",
         rows=(2490, 277)),
    Task("wnli", "WNLI", ("sentence1", "sentence2", "label"), ("0", "1"), ("accuracy",), "WNLI.zip",
         rows=(635, 71)),
]


def get_task(name):
    """The GLUE task called `name`, case-insensitive, '-' optional (cola, CoLA, sts-b, stsb,
    SST2); a Task is returned as it is, so every function here takes either."""
    if isinstance(name, Task):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    for task in _TASKS:
        if task.name.replace("-", "") == key:
            return task
    raise ValueError(f"unknown GLUE task {name!r}; known tasks: "
                     f"{', '.join(t.name for t in _TASKS)}")


def resolve_data_dir(data_dir=None):
    """--data_dir, else $GLUE_DIR, else ./glue_data."""
    return Path(data_dir or os.environ.get("GLUE_DIR") or "glue_data").expanduser()


def task_folder(task, data_dir=None):
    """<data_dir>/<Task>/, once the data dir is known not to be a file or the task's own folder."""
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"the data dir {root} is a file: point --data_dir (or $GLUE_DIR) "
                                 f"at the folder that holds {task.dir}/")
    if not (root / task.dir).exists() and (root / task.files[0][1]).is_file():
        raise NotADirectoryError(f"the data dir {root} holds a {task.files[0][1]} itself: if it is "
                                 f"{task.dir}'s folder, pass its parent, {root.parent}")
    return root / task.dir


class RowCountWarning(UserWarning):
    """A task file holds another number of rows than GLUE's: a truncated or edited copy."""


def glue_rows(task, split):
    """GLUE's number of data rows in the split's file (None where unknown)."""
    return dict(zip((s for s, _ in task.files), task.rows)).get(split)


def read_split(task, split, data_dir=None):
    """Examples of one split ("train", "dev"; MNLI also "dev_mismatched") of a task (or its name)
    from <data_dir>/<Task>/*.tsv. A file whose number of rows is not GLUE's warns (RowCountWarning)
    with the file, the counts and the fix, and says the file was cut if its last line has no line
    end; a last line with too few fields is refused (ValueError)."""
    task = get_task(task)
    examples, path = _read(task, split, data_dir)
    rows = glue_rows(task, split)
    if rows is not None and len(examples) != rows:
        with open(path, "rb") as f:  # a cut inside a last field (a CoLA sentence) keeps its fields
            cut = f.seek(-1, os.SEEK_END) and f.read(1) != b"\n"
        warnings.warn(f"{path} has {len(examples)} rows where GLUE's has {rows}"
                      + (" and its last line has no line end: it was cut short, its last row "
                         "likely cut mid-text." if cut else ": a truncated or edited copy?")
                      + f" For GLUE's own, delete {path.parent} and run again (train.py "
                      "downloads it)", RowCountWarning, stacklevel=2)
    return examples


def _read(task, split, data_dir):  # (examples, path) of one split, every row checked
    files = dict(task.files)
    if split not in files:
        raise ValueError(f"{task.name} has splits {list(files)}, not {split!r}")
    folder = task_folder(task, data_dir)
    path = folder / files[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"{task.dir} {split} data not found; expected "
            f"{', '.join(map(str, missing_files(task, data_dir)))}. Put GLUE's {task.dir}/ folder "
            "in the data dir (--data_dir, else $GLUE_DIR, else ./glue_data), or fetch it with "
            f"data.download_task(data.get_task({task.name!r}), {str(folder.parent)!r})")
    # No quote handling (sentences contain '"'), split on '\n' only, utf-8-sig because MRPC
    # starts with a BOM.
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): is it GLUE's "
                         f"{task.dir}/{files[split]}? Restore it (delete {folder} and run again: "
                         "train.py downloads it)") from None
    rows = [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(lines, 1)
            if line.strip("\r")]
    if not rows:
        raise ValueError(f"{path} is empty; expected GLUE {task.dir} rows")
    header = list(task.header or rows.pop(0)[1])
    absent = [c for c in task.columns if c is not None and c not in header]
    if absent:
        raise ValueError(f"{path}:1: header {header} lacks column(s) {absent}; is this the GLUE "
                         f"{task.dir} file?")
    a, b, y = (None if c is None else header.index(c) for c in task.columns)
    examples = []
    for n, fields in rows:
        # the last line, with no line end
        if len(fields) != len(header) and n == len(lines) and lines[-1]:
            raise ValueError(f"{path}:{n}: the last line has {len(fields)} of {len(header)} "
                             "tab-separated fields and no line end: the file is cut short. "
                             f"Restore it whole (delete {folder} and run again: train.py downloads "
                             "it)")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{n}: expected {len(header)} tab-separated fields "
                             f"({', '.join(header)}), found {len(fields)}")
        examples.append(Example(fields[a], None if b is None else fields[b],
                                _label(task, fields[y], path, n)))
    if not examples:
        raise ValueError(f"{path}: header but no data rows")
    return examples, path


def _label(task, raw, path, n):
    if not task.labels:  # regression: STS-B similarity score 0..5
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected a numeric score, found {raw!r}") from None
    if raw not in task.labels:
        raise ValueError(f"{path}:{n}: unknown label {raw!r}; {task.name} labels are "
                         f"{', '.join(task.labels)}")
    return task.labels.index(raw)


def missing_files(task, data_dir=None):
    """The paths of the task's files (train, dev, ...) that are not in <data_dir>/<Task>/."""
    task = get_task(task)
    folder = task_folder(task, data_dir)
    return [folder / f for _, f in task.files if not (folder / f).is_file()]


# --- Download: the task's files, fetched, checked and moved into place all at once ----------------


class DownloadError(Exception):
    """A task could not be downloaded; the message says what to fetch by hand and where to put
    it."""


def task_sources(task, base_url=None):
    """{file name: URL} of what makes <Task>/: GLUE's archive, or for MRPC the two files GLUE's
    script builds it from. base_url (else $GLUE_URL) is a mirror, http(s):// or file://, holding
    those names."""
    base = base_url or os.environ.get("GLUE_URL")
    if base:
        return {name: base.rstrip("/") + "/" + name
                for name in ([task.zip] if task.zip else MRPC_SOURCES)}
    return {task.zip: GLUE_URL + task.zip} if task.zip else dict(MRPC_SOURCES)


def fetch(url, path, log=print):
    """Stream url to path, with a progress line at most every second. A body shorter than the
    Content-Length its server announced (a dropped connection) is an error, not a short file."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            got, shown = 0, time.monotonic()
            log(f"downloading {url}" + (f" ({total / 1e6:.1f} MB)" if total else ""))
            while chunk := response.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
                if time.monotonic() - shown >= 1:
                    log(f"  {got / 1e6:.1f} MB"
                        + (f" of {total / 1e6:.1f} MB ({got / total:.0%})" if total else ""))
                    shown = time.monotonic()
    except (OSError, http.client.HTTPException) as e:
        # "HTTP Error 404: ..."
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DownloadError(f"could not fetch {url}: {reason}") from None
    if total and got != total:
        raise DownloadError(f"{url} was cut short: {got} of {total} bytes arrived")


def unzip_task(archive, task, folder):
    """Unpack the <Task>/ members of a GLUE archive into folder, once every member passes its CRC
    check and the task's files are all there."""
    with zipfile.ZipFile(archive) as z:
        bad = z.testzip()
        if bad:
            raise DownloadError(f"{archive.name} is corrupt: {bad} fails its CRC check")
        names = z.namelist()
        absent = [f"{task.dir}/{f}" for _, f in task.files if f"{task.dir}/{f}" not in names]
        if absent:
            raise DownloadError(f"{archive.name} lacks {', '.join(absent)}")
        for name in names:
            if name.startswith(task.dir + "/"):
                z.extract(name, folder)


def build_mrpc(folder):
    """<folder>/MRPC/ from <folder>/msr_paraphrase_train.txt and mrpc_dev_ids.tsv, as GLUE's
    download_glue_data.py builds it: the source's header line heads both files, the pairs (#1 ID, #2
    ID) listed in the ids go to dev.tsv and the others to train.tsv, each row stripped and
    tab-joined."""
    with open(folder / "mrpc_dev_ids.tsv", encoding="utf-8") as f:
        dev_ids = {tuple(line.strip().split("\t")) for line in f if line.strip()}
    (folder / "MRPC").mkdir()
    shutil.copyfile(folder / "mrpc_dev_ids.tsv", folder / "MRPC" / "dev_ids.tsv")
    out = {split: open(folder / "MRPC" / f"{split}.tsv", "w", encoding="utf-8", newline="\n")
           for split in ("train", "dev")}
    try:
        with open(folder / "msr_paraphrase_train.txt", encoding="utf-8") as source:
            header = source.readline()
            for f in out.values():
                f.write(header)
            for n, line in enumerate(source, 2):
                fields = line.strip().split("\t")
                if len(fields) != 5:
                    raise DownloadError(f"msr_paraphrase_train.txt:{n}: expected 5 tab-separated "
                                        "fields (Quality, #1 ID, #2 ID, #1 String, #2 String), "
                                        f"found {len(fields)}")
                split = "dev" if tuple(fields[1:3]) in dev_ids else "train"
                out[split].write("\t".join(fields) + "\n")
    finally:
        for f in out.values():
            f.close()


def check_task(task, data_dir):
    """Every file of the task reads as GLUE's and, where known, has GLUE's number of rows."""
    for split, file in task.files:
        n, rows = len(_read(task, split, data_dir)[0]), glue_rows(task, split)
        if rows is not None and n != rows:
            raise DownloadError(f"{task.dir}/{file} has {n} rows where GLUE's has {rows}")


def download_task(task, data_dir, base_url=None, log=print):
    """Fetch a task into <data_dir>/<Task>/, all or nothing: download into a temporary folder inside
    data_dir, check it (a zip whose members pass their CRC check and hold the task's files; every
    row readable; GLUE's row counts), then move <Task>/ into place with one os.replace. base_url
    (else $GLUE_URL) is a mirror; the default is GLUE's own URLs. A failure raises DownloadError
    naming what to fetch and where to put it (a data dir it may not write: PermissionError naming
    it), and leaves neither a task folder nor temporary files behind (nor the data dir, where this
    call made it). A complete task folder is left as it is."""
    task = get_task(task)
    data_dir, sources = Path(data_dir), task_sources(task, base_url)
    target = task_folder(task, data_dir)
    missing = missing_files(task, data_dir)
    if not missing:
        return target
    if target.exists():
        raise DownloadError(f"{target} exists but lacks {', '.join(p.name for p in missing)}: "
                            "complete it or remove it so that it can be downloaded whole")
    made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]  # deepest first
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        partial = Path(tempfile.mkdtemp(prefix=f".{task.dir}-", suffix=".partial", dir=data_dir))
    except PermissionError as e:  # name the folder, not the temporary one it could not make
        raise PermissionError(e.errno, e.strerror, str(data_dir)) from None
    log(f"{task.dir} is not in {data_dir}: downloading it")
    try:
        for name, url in sources.items():
            fetch(url, partial / name, log)
        if task.zip:
            unzip_task(partial / task.zip, task, partial)
        else:
            build_mrpc(partial)
        check_task(task, partial)
        os.replace(partial / task.dir, target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a truncated or damaged archive
        raise DownloadError(f"{task.zip} is not a readable zip ({e}). "
                            f"{manual_steps(task, sources, target)}") from None
    except (DownloadError, OSError, ValueError) as e:
        raise DownloadError(f"{e}. {manual_steps(task, sources, target)}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if not target.exists():  # failed: the folders this call made go too
            for folder in made:
                folder.rmdir()  # empty: they held only `partial`
    log(f"{task.dir}: {', '.join(f for _, f in task.files)} checked and unpacked into {target}")
    return target


def manual_steps(task, sources, target):
    """How to get the task by hand, or use GLUE files already here, in one sentence."""
    urls = " and ".join(sources.values())
    have = (f"; GLUE files you have elsewhere: train.py --data_dir DIR (or GLUE_DIR=DIR) with "
            f"DIR/{task.dir}/train.tsv")
    if task.zip:
        return (f"To get {task.dir} by hand, fetch {urls} and unzip it in {target.parent} so that "
                f"{target / 'train.tsv'} exists, or save it in a folder and set GLUE_URL to that "
                "folder's file:// URL (or to a mirror)" + have)
    return (f"To get {task.dir} by hand, fetch {urls}, save them in a folder as "
            f"{' and '.join(sources)} and set GLUE_URL to that folder's file:// URL: {target} is "
            "then built from them as GLUE's download_glue_data.py builds it" + have)


# --- Tokenizers: encode(text, pair) == Hugging Face tokenizer(text, pair)["input_ids"] ------------


class Tokenizer:
    """What both kinds share: special tokens, the pair layout, longest-first truncation."""
    specials = ()  # matched verbatim in raw text and mapped to their ids, as Hugging Face does

    def __init__(self, vocab, cls, sep, pad, unk, n_sep, pair_type):
        absent = [t for t in (cls, sep, pad, unk) if t not in vocab]
        if absent:
            raise ValueError(f"vocabulary lacks the special token(s) {absent}")
        self.vocab = vocab  # token -> id
        self.cls_id, self.sep_id, self.pad_id, self.unk_id = (vocab[t]
                                                              for t in (cls, sep, pad, unk))
        self.vocab_size = max(vocab.values()) + 1  # embedding rows needed
        self.n_sep = n_sep  # separators between A and B: BERT [SEP], RoBERTa </s></s>
        self.pair_type = pair_type  # token type id of the second segment: BERT 1, RoBERTa 0
        alternatives = sorted((re.escape(t) for t in self.specials if t in vocab), key=len,
                              reverse=True)
        self.special_re = re.compile("(" + "|".join(alternatives) + ")")
        self.cache = {}  # word -> ids

    def tokenize(self, text):
        """Ids of `text`, without [CLS]/[SEP]: words() of each stretch between special tokens, then
        word_ids()."""
        ids = []
        for i, part in enumerate(self.special_re.split(text)):  # odd parts are special tokens
            if i % 2:
                ids.append(self.vocab[part])
                continue
            for word in self.words(part):
                if word not in self.cache:
                    self.cache[word] = self.word_ids(word)
                ids += self.cache[word]
        return ids

    def encode_pair(self, text, pair=None, max_len=None):
        """Ids and token type ids of `[CLS] A [SEP] (B [SEP])`; RoBERTa: `<s> A </s>(</s> B
        </s>)`."""
        a = self.tokenize(text)
        b = self.tokenize(pair) if pair else None  # as Hugging Face, an empty pair is no pair
        if max_len is not None:
            room = max_len - 2 - (0 if b is None else self.n_sep)
            if room < 0:
                raise ValueError(f"max_len={max_len} is shorter than the {max_len - room} special "
                                 "tokens")
            a, b = truncate(a, b, room)
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            tail = [self.sep_id] * (self.n_sep - 1) + b + [self.sep_id]
            ids, types = ids + tail, types + [self.pair_type] * len(tail)
        return ids, types

    def encode(self, text, pair=None, max_len=None):
        return self.encode_pair(text, pair, max_len)[0]


def truncate(a, b, room):
    """Hugging Face's longest-first rule, as its Rust tokenizers apply it: when both do not fit, the
    shorter sequence (A on ties) keeps up to room // 2 tokens and the longer one the rest.
    (transformers' old Python tokenizers cut one token at a time from the longer, B on ties: on odd
    rooms A kept one more.)"""
    if b is None or len(a) + len(b) <= room:
        return a[:room], b
    if len(a) <= len(b):
        keep = min(len(a), room // 2)
        return a[:keep], b[:room - keep]
    keep = min(len(b), room // 2)
    return a[:room - keep], b[:keep]


def _bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters (spaces become 'Ġ')."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in bs]  # the other bytes go to chr(256), chr(257), ...
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


@functools.cache
def _gpt2_pattern():
    r"""GPT-2's pre-tokenizer regex. Python's re lacks \p{L}/\p{N}, so they are spelled out as code
    point ranges from unicodedata, and \s as Unicode White_Space (re's \s also matches
    \x1c-\x1f)."""
    cats = [unicodedata.category(chr(c))[0] for c in range(sys.maxunicode + 1)]

    def ranges(kind):
        cps = [c for c, k in enumerate(cats) if k == kind]
        runs = (list(run) for _, run in itertools.groupby(enumerate(cps), lambda t: t[1] - t[0]))
        return "".join(f"\\U{r[0][1]:08x}-\\U{r[-1][1]:08x}" for r in runs)

    L, N = ranges("L"), ranges("N")
    S = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"
                      rf"|[{S}]+(?![^{S}])|[{S}]+")


class BPETokenizer(Tokenizer):
    """Byte-level BPE of GPT-2/RoBERTa from vocab.json + merges.txt. Case is kept."""
    specials = ("<s>", "</s>", "<unk>", "<pad>", "<mask>")

    def __init__(self, vocab, merges):
        super().__init__(vocab, "<s>", "</s>", "<pad>", "<unk>", n_sep=2, pair_type=0)
        self.merges = merges  # [(left, right)], highest priority first
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_char = _bytes_to_unicode()

    def words(self, text):
        return _gpt2_pattern().findall(text)

    def word_ids(self, word):
        parts = [self.byte_char[b] for b in word.encode("utf-8")]
        # merge the best-ranked adjacent pair, leftmost first, until none is known
        while len(parts) > 1:
            rank, i = min((self.ranks.get(p, math.inf), i)
                          for i, p in enumerate(zip(parts, parts[1:])))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab.get(t, self.unk_id) for t in parts]

    def save(self, directory):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n"
                                      + "".join(f"{a} {b}\n" for a, b in self.merges),
                                      encoding="utf-8")


_CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF),
        (0x2F800, 0x2FA1F)]  # BERT's "Chinese character" blocks


@functools.cache
def _char_class(c):
    """How BERT's basic tokenizer treats a character: 'drop', 'space', 'cjk', 'punct' or ''."""
    cat, cp = unicodedata.category(c), ord(c)
    if c in " \t\n\r" or cat == "Zs":
        return "space"
    if cp == 0xFFFD or cat[0] == "C":
        return "drop"
    if any(lo <= cp <= hi for lo, hi in _CJK):
        return "cjk"
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat[0] == "P":
        return "punct"  # ASCII symbols such as $ + < = > ^ ` | ~ count as punctuation too
    return ""


def bert_words(text, lower=True, strip_accents=True):
    """BERT's basic tokenization: drop controls, space out CJK, lowercase, strip accents, split off
    punctuation."""
    text = "".join(" " if k == "space" else f" {c} " if k == "cjk" else c
                   for c in text if (k := _char_class(c)) != "drop")
    if lower:  # character by character, as Hugging Face's Rust normalizer: no final-sigma rule
        text = "".join(map(str.lower, text))
    if strip_accents:  # NFD, then drop the combining marks
        text = "".join(c for c in unicodedata.normalize("NFD", text)
                       if unicodedata.category(c) != "Mn")
    return "".join(f" {c} " if _char_class(c) == "punct" else c for c in text).split()


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece from vocab.txt: bert_words, then greedy longest-match-first with '##'
    continuations."""
    specials = ("[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]")

    def __init__(self, vocab, lower=True, strip_accents=None):
        super().__init__(vocab, "[CLS]", "[SEP]", "[PAD]", "[UNK]", n_sep=1, pair_type=1)
        self.lower = lower
        # Hugging Face's default
        self.strip_accents = lower if strip_accents is None else strip_accents

    def words(self, text):
        return bert_words(text, self.lower, self.strip_accents)

    def word_ids(self, word):  # greedy longest-match-first
        if len(word) > 100:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return [self.unk_id]  # one unknown piece makes the whole word [UNK]
            ids.append(self.vocab[piece])
            start = end
        return ids

    def save(self, directory):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tokens = sorted(self.vocab, key=self.vocab.get)
        (d / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        config = {"do_lower_case": self.lower, "strip_accents": self.strip_accents}
        (d / "tokenizer_config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")


def load_tokenizer(path):
    """vocab.json + merges.txt -> byte-level BPE (RoBERTa); vocab.txt -> WordPiece (BERT, tiny
    encoder)."""
    d = Path(path)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
        return BPETokenizer(vocab, [tuple(line.split()) for line in lines if line
                                    and not line.startswith("#version")])
    if (d / "vocab.txt").is_file():
        with open(d / "vocab.txt", encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        config_path = d / "tokenizer_config.json"
        config = (json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file()
                  else {})
        return WordPieceTokenizer(vocab, config.get("do_lower_case", True),
                                  config.get("strip_accents"))
    raise FileNotFoundError(f"no tokenizer in {d}: expected {d / 'vocab.json'} + "
                            f"{d / 'merges.txt'} (byte-level BPE) or {d / 'vocab.txt'} (WordPiece)")


def build_tokenizer(texts, min_freq=1, max_size=30000):
    """Whole-word vocabulary of the tiny encoder, from the training texts: a WordPiece with no '##'
    pieces, so every word outside the vocabulary is [UNK]. Save it with the run:
    tokenizer.save(out_dir)."""
    counts = Counter(w for text in texts for w in bert_words(text))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
    kept = specials + words[:max_size - len(specials)]
    return WordPieceTokenizer({t: i for i, t in enumerate(kept)})


# --- Encoding and batches -------------------------------------------------------------------------


def encode_examples(examples, tokenizer, max_len):
    """[(input_ids, token_type_ids, label)] for each example, truncated to max_len."""
    return [(*tokenizer.encode_pair(a, b, max_len), y) for a, b, y in examples]


def batches(encoded, batch_size, pad_id, shuffle=False, seed=0):
    """Dicts of tensors, padded to the longest row of each batch. Pass seed + epoch for a new order
    per epoch."""
    order = range(len(encoded))
    if shuffle:
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(encoded), batch_size):
        rows = [encoded[i] for i in order[start:start + batch_size]]
        L = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros(len(rows), L, dtype=torch.long)  # [B, L], 1 = real token
        token_type_ids = torch.zeros(len(rows), L, dtype=torch.long)  # [B, L]
        for r, (ids, types, _) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention_mask[r, :len(ids)] = 1
            token_type_ids[r, :len(types)] = torch.tensor(types)
        regression = isinstance(rows[0][2], float)
        labels = torch.tensor([y for _, _, y in rows],
                              dtype=torch.float32 if regression else torch.long)  # [B]
        yield {"input_ids": input_ids, "attention_mask": attention_mask,
               "token_type_ids": token_type_ids, "labels": labels}


# --- Metrics: GLUE's official ones ----------------------------------------------------------------


def _pearson(x, y):
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0  # a constant has no correlation; report 0, not NaN
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def _ranks(x):  # 1-based ranks, ties get their average rank (as scipy.stats.rankdata)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def compute_metrics(task, predictions, labels):
    """task.metrics -> value (a task or its name): class ids (or scores for STS-B) against gold
    labels. F1 is of class 1."""
    task = get_task(task)
    p = np.asarray(predictions, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.shape != y.shape or len(p) == 0:
        raise ValueError(f"need as many predictions as labels (and some): got {len(p)} and "
                         f"{len(y)}")
    tp, tn = float(((p == 1) & (y == 1)).sum()), float(((p != 1) & (y != 1)).sum())
    fp, fn = float(((p == 1) & (y != 1)).sum()), float(((p != 1) & (y == 1)).sum())
    mcc_den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    metric = {
        "accuracy": lambda: float((p == y).mean()),
        "f1": lambda: 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "mcc": lambda: (tp * tn - fp * fn) / mcc_den if mcc_den else 0.0,
        "pearson": lambda: _pearson(p, y),
        "spearman": lambda: _pearson(_ranks(p), _ranks(y)),
    }
    return {name: metric[name]() for name in task.metrics}
