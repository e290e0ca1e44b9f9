"""Tests of train.py: runs end to end for every init, the real-loss check, resume, run
directories, torchrun, exports and every bad flag."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import cglora
import data
import models
import train
from cglora import add_lora
from models import from_pretrained, hf_names
from conftest import (_HERE, _glue_dir, _glue_fixture, _metrics, _pretrained_checkpoint,
                      _real_split, _train, _zip)
from test_cglora import _ACCELERATOR, _Accelerator, _batches, _model


# The GLUE fixtures here hold a few rows, not GLUE's counts: read_split's RowCountWarning is expected
# (pytest.warns still sees it where a test checks it).
pytestmark = pytest.mark.filterwarnings("ignore::data.RowCountWarning")


@pytest.mark.parametrize("method", ["cg-lora", "cg-lora-shift", "lora", "rslora", "lora-ga", "lora-one", "full"])
def test_train_end_to_end_every_init(tmp_path, glue, method):
    history = _train(tmp_path, "--init", method, "--epochs", "3", "--lr", "3e-3")
    run = tmp_path / "run"
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and "dev_mcc" in history[-1]
    assert history[-1]["train_loss"] < 0.9 * history[1]["train_loss"]  # it learns
    init = json.loads((run / "init.json").read_text())
    assert init["method"] == method and init["seconds"] > 0 and init["peak_memory_mib"] > 0
    assert json.loads((run / "config.json").read_text())["init"] == method
    assert (run / "checkpoint.pt").exists() and (run / "tokenizer").is_dir()
    if method != "full":
        assert {r["layer"] for r in init["layers"]} == {f"layers.{i}.{n}" for i in (0, 1) for n in ("query", "value")}
        if method.startswith("cg-lora"):
            assert all(0 < r["captured"] <= 1 for r in init["layers"])
        adapter = torch.load(run / "adapter_model.bin")
        assert "base_model.model.layers.0.query.lora_A.weight" in adapter
        assert not torch.equal(adapter["base_model.model.layers.0.query.lora_B.weight"],
                               torch.load(run / "adapter_init" / "adapter_model.bin")["base_model.model.layers.0.query.lora_B.weight"])


def test_every_data_driven_init_is_judged_by_the_real_loss_from_the_same_W0(tmp_path, glue, capsys):
    """The real loss check (§8.2): the examples after the calibration batches, the loss at W0 and along each
    layer's quadratic-model step; a shifted init is judged, after it is written, from the original W0, so
    every method of one seed sees one loss at W0. The decrease is the loss at W0 minus the best scale's, beside the calibration model's
    prediction (the summed in-sample q)."""
    summaries = {}
    for method in ("cg-lora", "cg-lora-shift", "lora-ga", "lora-one"):
        _train(tmp_path, "--init", method, "--max_steps", "1", "--real_check", "2", "--diagnostics",
               out=method)
        summaries[method] = json.loads((tmp_path / method / "init.json").read_text())["summary"]
        assert "real loss check on 16 held-out examples" in capsys.readouterr().out
    for method, s in summaries.items():
        assert s["real_examples"] == 16 and set(map(float, s["real_losses"])) == set(train.REAL_SCALES)
        assert s["real_loss_at_W0"] == pytest.approx(summaries["cg-lora"]["real_loss_at_W0"], rel=1e-6), method
        assert s["real_decrease"] == pytest.approx(s["real_loss_at_W0"] - min(s["real_losses"].values()))
        assert s["predicted_decrease"] == pytest.approx(s["insample"])
    assert summaries["cg-lora-shift"]["real_losses"] == pytest.approx(summaries["cg-lora"]["real_losses"], rel=1e-5)
    assert summaries["cg-lora-shift"]["real_loss_at_init"] == pytest.approx(summaries["cg-lora"]["real_loss_at_init"],
                                                                           rel=1e-5)  # the same update, before the shift
    _train(tmp_path, "--init", "lora", "--max_steps", "1", out="plain")  # no statistics, no direction to judge
    assert "real_decrease" not in json.loads((tmp_path / "plain" / "init.json").read_text())["summary"]


def test_the_real_check_also_judges_the_init_as_written():
    """Called after the init is written, real_check measures from the model before it (W0, the
    original one for a shifted init); real_loss_at_init is the held-out loss of the model as an
    unshifted init leaves it (W0 + s B A at the init size); a shifted init is judged at the same
    update, while its model keeps W0's loss."""
    held = _batches(seed=3, sizes=(4, 4))

    @torch.no_grad()
    def loss_of(model):  # the mean example loss of the model as it is, in eval mode
        model.eval()
        return torch.cat([nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"],
                                                      reduction="none") for b in held]).mean().item()

    for method in ("lora-one", "cg-lora-shift"):
        model = _model()
        layers = add_lora(model, ["query", "value"], rank=2, alpha=4, rslora=True)
        stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, _batches(sizes=(3, 2, 3, 2)))
        before = loss_of(model)
        rows = cglora.init_adapters(layers, stats, method, damping=1.0, init_norm=0.5)
        real = train.real_check(model, layers, rows, held, lambda *a: None)  # after the init
        assert real["real_loss_at_W0"] == pytest.approx(before, rel=1e-6)  # the model before it
        if method == "lora-one":
            assert real["real_loss_at_init"] == pytest.approx(loss_of(model), rel=1e-6)
        else:
            assert loss_of(model) == pytest.approx(real["real_loss_at_W0"], rel=1e-5)
            with torch.no_grad():  # undo the shift: W0 + s B A
                for m in layers.values():
                    m.base.weight += m.scaling * m.lora_B0 @ m.lora_A0
            assert real["real_loss_at_init"] == pytest.approx(loss_of(model), rel=1e-5)
        assert abs(real["real_loss_at_init"] - real["real_loss_at_W0"]) > 1e-4  # the update moved the loss


def test_train_regression_end_to_end_with_sampled_fisher(tmp_path, glue):
    """STS-B (one output, MSE loss, labels for T drawn from N(f, 1)): dev scored by correlation, and learnt."""
    history = _train(tmp_path, "--task", "sts-b", "--fisher", "sampled", "--epochs", "3")
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and {"dev_pearson", "dev_spearman"} <= set(history[-1])
    assert history[-1]["dev_pearson"] > 0.9 and history[-1]["dev_loss"] < 0.2 * history[0]["dev_loss"]


def test_evaluate_regression_is_mse_and_correlation_over_all_examples():
    class Half(nn.Module):  # predicts half its first token id
        def forward(self, input_ids, attention_mask, token_type_ids):
            return input_ids[:, :1].float() / 2

    ids, labels = [3, 8, 5, 12, 7], [1.0, 3.5, 2.0, 4.0, 4.5]
    dev = list(data.batches([([i, 1], [0, 0], y) for i, y in zip(ids, labels)], 3, pad_id=0))  # 3 + 2
    got = train.evaluate(Half(), dev, data.get_task("sts-b"), train.Config(), torch.device("cpu"))
    f, y = np.array(ids) / 2, np.array(labels)
    assert got["loss"] == pytest.approx(np.square(f - y).mean())
    assert got["pearson"] == pytest.approx(np.corrcoef(f, y)[0, 1])
    assert got["spearman"] == pytest.approx(np.corrcoef(f.argsort().argsort(), y.argsort().argsort())[0, 1])


def test_fisher_flag_reaches_the_statistics(tmp_path, glue):
    """--fisher sampled gives another T, so another init than empirical; one seed gives one sampled init."""
    B = {}
    for fisher, out in (("empirical", "e"), ("sampled", "s"), ("sampled", "s_again")):
        _train(tmp_path, "--fisher", fisher, "--max_steps", "1", out=out)
        B[out] = torch.load(tmp_path / out / "adapter_init" / "adapter_model.bin")["base_model.model.layers.0.query.lora_B.weight"]
    assert torch.equal(B["s"], B["s_again"]) and not torch.allclose(B["s"], B["e"], rtol=1e-3, atol=0)


def test_train_on_real_cola(tmp_path, capsys):
    """30 steps on the real CoLA files (an epoch is 267): the whole files are read, and the dev loss of
    the checkpoint falls from the fresh head's toward the label prior's entropy (dev: 721 / 1043
    acceptable, 0.618), which needs the labels of both files read right."""
    dev_set = _real_split("cola", "dev")
    run = tmp_path / "run"
    train.main(["--task", "cola", "--data_dir", str(_glue_dir()), "--max_steps", "30", "--out", str(run),
                "--log_every", "1000"])
    assert "cola: 8551 train / 1043 dev examples" in capsys.readouterr().out
    cfg = train.load_config(run)
    tokenizer = data.load_tokenizer(run / "tokenizer")
    model = train.build_model(cfg, tokenizer, 2)
    add_lora(model, cfg.targets.split(","), cfg.rank, cfg.alpha, rslora=cglora.RSLORA[cfg.init], trainable=["head"])
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    model.load_state_dict(ck["model"])
    dev = list(data.batches(data.encode_examples(dev_set, tokenizer, cfg.max_len), 64, tokenizer.pad_id))
    after = train.evaluate(model, dev, data.get_task("cola"), cfg, torch.device("cpu"))
    assert ck["step"] == 30 and after["loss"] < _metrics(run)[0]["dev_loss"] - 0.03


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("stops,device", [((12,), "cpu"), ((5, 17), "cpu"), pytest.param((5, 17), "cuda", marks=_CUDA)])
def test_resume_equals_uninterrupted_run(tmp_path, glue, stops, device):
    """Stopped at the end of epoch 1 (96 / 8 = 12 steps), or mid-epoch 1 and again mid-epoch 2, then
    resumed: metrics.jsonl equals the uninterrupted run's, train_loss (the mean over every step of the
    epoch) and the step rows included, but for the evaluations at the stops. Dropout in the encoder and
    the adapters draws from the RNG, so its state must resume."""
    flags = ["--init", "cg-lora", "--dropout", "0.1", "--device", device, "--log_every", "4"]
    _train(tmp_path, *flags, out="a")
    _train(tmp_path, *flags, "--max_steps", str(stops[0]), out="b")
    for stop in (*stops[1:], 0):
        assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] in stops
        train.main(["--resume", "--out", str(tmp_path / "b"), "--max_steps", str(stop), "--log_every", "4"])
    rows = {run: [{k: v for k, v in r.items() if k != "elapsed"} for r in train.read_metrics(tmp_path / run)]
            for run in "ab"}
    assert [r["step"] for r in rows["b"] if r["kind"] == "eval" and r["step"] in stops] == list(stops)
    at_stops = [r for r in rows["b"] if r["kind"] == "eval" and r["step"] in stops and r["step"] % 12]  # mid-epoch
    assert all(r["epoch"] == round(r["step"] / 12, 4) for r in at_stops)
    stop_rows = [r for r in rows["b"] if r["kind"] == "step" and r["step"] in stops and r["step"] % 4]
    assert [r for r in rows["b"] if r not in at_stops + stop_rows] == rows["a"]


def _refused(capsys, args):
    """The one error line of a refused train.py call (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _module_name(cfg, model):
    """Our module name -> the name the exported adapter gives it (from --pretrained: the checkpoint's)."""
    rename = train.hf_name(cfg, model)
    return lambda module: rename(f"{module}.weight").removesuffix(".weight")


def _files(run):
    return {p.name: p.stat().st_mtime_ns for p in run.iterdir()}


def test_default_run_directory_tells_experiments_apart():
    def out(*flags, world=1):  # the default --out of these flags (name, value, ...) under `world` processes
        return train.check_flags(train.Config(**dict(zip(flags[::2], flags[1::2]))), world).out

    assert out() == "runs/cola-tiny-cg-lora-r8-query+value-s0"
    assert out("pretrained", "path/to/all-MiniLM-L6-v2/") == "runs/cola-all-MiniLM-L6-v2-cg-lora-r8-query+value-s0"
    assert out("targets", "all", "rank", 4) == "runs/cola-tiny-cg-lora-r4-all-s0"
    assert out(world=2) == "runs/cola-tiny-cg-lora-r8-query+value-s0-w2"
    assert len({out(), out("rank", 4), out("targets", "query"), out("init", "lora"), out("seed", 1),
                out("task", "rte"), out(world=2)}) == 7


def test_a_run_directory_holds_one_run(tmp_path, glue, capsys):
    """A second run into a run's directory is refused and changes nothing; --overwrite clears it first, so
    a --pretrained run leaves no tiny-encoder tokenizer behind; it refuses to clear files train.py did not
    write; --resume refuses flags that differ from the run's."""
    run = tmp_path / "run"
    _train(tmp_path, "--max_steps", "2")
    before = _files(run)
    args = ["--data_dir", str(glue), "--out", str(run), "--calib_batches", "2", "--batch_size", "8"]
    line = _refused(capsys, [*args, "--rank", "4"])
    assert line == (f"error: {run} holds another run (adapter_config.json, adapter_init, adapter_model.bin, "
                    f"checkpoint.pt, ...): continue it with --resume, pick a new --out, or pass --overwrite to "
                    f"clear it first")
    assert _files(run) == before
    line = _refused(capsys, ["--resume", "--out", str(run), "--rank", "4"])
    assert f"--resume continues {run} as it was configured: --rank 4 (the run has 8); drop" in line
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    _train(tmp_path, "--pretrained", str(tmp_path / "ckpt"), "--max_steps", "2", "--overwrite")
    assert not (run / "tokenizer").exists() and train.load_config(run).pretrained == str(tmp_path / "ckpt")
    assert all(p.stat().st_mtime_ns > max(before.values()) for p in run.iterdir())  # every file is the new run's
    (run / "notes.txt").write_text("mine")
    line = _refused(capsys, [*args, "--overwrite"])
    assert "--overwrite clears only what train.py writes" in line and "notes.txt" in line
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoint.pt").exists()


def test_resume_refuses_a_checkpoint_that_is_not_the_runs_latest_state(tmp_path, glue, capsys):
    run = tmp_path / "run"
    _train(tmp_path, "--max_steps", "12")  # a checkpoint at the end of epoch 1
    resume = ["--resume", "--out", str(run)]
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, rank=4)))  # another run's config beside it
    assert f"{run / 'checkpoint.pt'} is another run's: it has rank 8 where {run / 'config.json'} has rank 4" \
        in _refused(capsys, resume)
    (run / "config.json").write_text(json.dumps(config))
    old = (run / "checkpoint.pt").read_bytes()
    train.main(resume)  # to the end: step 24
    (run / "checkpoint.pt").write_bytes(old)  # a stale checkpoint
    line = _refused(capsys, resume)
    assert "(step 12) is not the run's latest state" in line and "(the last at step 24)" in line


def test_ctrl_c_says_where_the_last_checkpoint_is_and_resume_continues(tmp_path, glue, capsys, monkeypatch):
    """Interrupted before the first checkpoint: one line, nothing to resume (and --resume refuses); after
    one: one line naming it and the resume command, which gives the uninterrupted run's evaluations."""
    uninterrupted = _train(tmp_path, out="a")
    evaluate, calls = train.evaluate, []

    def interrupt_at(n):
        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)
        calls.clear()
        monkeypatch.setattr(train, "evaluate", fake)

    for n, out in ((2, "b"), (3, "c")):  # in the evaluation at the end of epoch 1, or of epoch 2
        interrupt_at(n)
        with pytest.raises(SystemExit) as e:
            _train(tmp_path, out=out)
        err = capsys.readouterr().err.splitlines()
        said = (f"interrupted before the run's first checkpoint: nothing to resume; start it again with "
                f"--overwrite --out {tmp_path / out}" if n == 2 else
                f"interrupted: the last checkpoint is {tmp_path / out / 'checkpoint.pt'} (step 12); continue with: "
                f"python train.py --resume --out {tmp_path / out}")
        assert e.value.code == 130 and [line for line in err if not line.startswith("warning: ")] == [said]
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert "--resume: no checkpoint in" in _refused(capsys, ["--resume", "--out", str(tmp_path / "b")])
    train.main(["--resume", "--out", str(tmp_path / "c")])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(_metrics(tmp_path / "c")) == strip(uninterrupted)


def test_max_steps_evaluates_the_last_step(tmp_path, glue, capsys):
    history = _train(tmp_path, "--max_steps", "5", "--log_every", "2")
    out = capsys.readouterr().out
    assert [(h["step"], h["epoch"]) for h in history] == [(0, 0), (5, round(5 / 12, 4))]
    assert "step 5/5 |" in out and "step 4/5 |" in out and "/24" not in out
    assert f"dev mcc {history[-1]['dev_mcc']:.4f} at step 5 (best" in out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 5


def test_best_is_over_the_evaluations_after_training_began(tmp_path, glue, capsys, monkeypatch):
    """Step 0's evaluation (the init and a fresh head) is no result of the run: where it scores highest,
    the done line's best is still a later evaluation's."""
    scores = iter([0.9, 0.1])
    monkeypatch.setattr(train, "evaluate", lambda *args: dict(mcc=next(scores), loss=1.0))
    _train(tmp_path, "--max_steps", "5")
    assert "dev mcc 0.1000 at step 5 (best 0.1000 at step 5, epoch 0.4167)" in capsys.readouterr().out


def test_long_passes_show_progress(tmp_path, glue, capsys, monkeypatch):
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0)  # every batch: as if each took a while
    _train(tmp_path, "--calib_batches", "3", "--max_steps", "1", "--damping", "auto")
    out = capsys.readouterr().out
    assert "statistics: 1/3 batches, eta" in out and "statistics: 2/3 batches" in out
    assert "choosing the damping among 7 values on 2 folds of the calibration batches" in out
    assert "evaluation: 1/2 batches, eta" in out  # 32 dev examples in batches of 16


def test_run_directory_has_what_an_analysis_needs(tmp_path, glue, capsys):
    """Step rows (train loss, learning rate) every --log_every steps and the evaluations in metrics.jsonl,
    the init summary in init.json, the versions and the data dir in config.json, curves.svg; --targets all."""
    run = tmp_path / "run"
    _train(tmp_path, "--targets", "all", "--log_every", "5", "--warmup", "0.25", "--diagnostics")
    assert "CoLA/train.tsv has 96 rows where GLUE's has 8551" in capsys.readouterr().err  # a warning line
    steps, evals = _metrics(run, "step"), _metrics(run, "eval")
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 24] and [r["step"] for r in evals] == [0, 12, 24]
    warm = 6  # 25% of 24 steps
    assert [r["lr"] for r in steps] == pytest.approx([1e-2 * min(s / warm, (24 - s + 1) / (24 - warm))
                                                      for s in (5, 10, 15, 20, 24)])
    assert all(r["train_loss"] > 0 for r in steps)
    init = json.loads((run / "init.json").read_text())
    layers, summary = init["layers"], init["summary"]
    assert len(layers) == 12  # all six linear types in both blocks
    total = lambda key: sum(r[key] for r in layers)  # noqa: E731
    assert summary["damping"] == init["damping"] == layers[0]["damping"]
    assert summary["heldout_ratio"] == pytest.approx(total("heldout") / total("heldout_lora_one"))
    assert summary["insample_ratio"] == pytest.approx(total("insample") / total("insample_lora_one"))
    assert summary["overlap_left"] == pytest.approx(total("overlap_left") / 12)
    config = json.loads((run / "config.json").read_text())
    assert config["targets"] == "query,key,value,attn_out,ffn_in,ffn_out"
    assert config["torch_version"] == torch.__version__
    assert config["data_dir"] == str(glue.resolve())
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_HERE, capture_output=True, text=True)
    assert config["code_version"].startswith(git.stdout.strip()) if git.returncode == 0 else config["code_version"]
    svg = (run / "curves.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and "loss: train" in svg and "dev mcc" in svg
    lines = [(line.split('stroke="')[1][:7], [tuple(map(float, xy.split(","))) for xy in
                                              line.split('points="')[1].split('"')[0].split()])
             for line in svg.splitlines() if 'stroke="#' in line]
    # train loss at each step row, dev loss and dev mcc at each evaluation
    assert [(color, len(points)) for color, points in lines] == [
        ("#1f77b4", len(steps)), ("#ff7f0e", len(evals)), ("#1f77b4", len(evals))]
    assert lines[1][1][0][0] == 44 and lines[2][1][0][0] == 360 + 44  # both start at step 0: the y axis
    assert all(f">{n}</text>" in svg for n in (0, 12, 24))  # the step axis numbered
    low = min([r["train_loss"] for r in steps] + [r["dev_loss"] for r in evals])
    assert f">{low:.3g}</text>" in svg  # the loss axis numbered from its lowest point
    odd = train.curves_svg([dict(kind="eval", step=s, dev_loss=0.5, dev_mcc=0.1) for s in (0, 801)], "mcc")
    assert 'middle">400</text>' in odd and 'middle">400.5' not in odd  # a step axis of whole steps


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while the new checkpoint is written, or between writing and renaming it, leaves the last
    good checkpoint loadable; the leftover partial file does not block the next save."""
    path = tmp_path / "checkpoint.pt"
    train.save_atomic({"step": 12}, path)

    def dies_mid_write(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # some bytes reach the disk, then the process dies
        raise KeyboardInterrupt

    def dies_before_rename(src, dst):
        raise KeyboardInterrupt

    for module, name, crash in ((torch, "save", dies_mid_write), (os, "replace", dies_before_rename)):
        with monkeypatch.context() as m:
            m.setattr(module, name, crash)
            with pytest.raises(KeyboardInterrupt):
                train.save_atomic({"step": 17}, path)
        assert torch.load(path) == {"step": 12}, name
    train.save_atomic({"step": 17}, path)
    assert torch.load(path) == {"step": 17}


@pytest.mark.parametrize("pretrained", [False, True])
def test_shifted_export_applies_to_the_original_weights(tmp_path, glue, pretrained):
    """merged.pt = the original weights + the exported adapters. With --pretrained the original weights
    are those of the model written into the checkpoint, and so is the function at step 0 (the shift
    keeps it): the step-0 dev loss is that model's."""
    source = _pretrained_checkpoint(tmp_path / "ckpt", glue) if pretrained else None
    history = _train(tmp_path, "--init", "cg-lora-shift", "--merge", "--epochs", "1",
                     *(["--pretrained", str(tmp_path / "ckpt")] if pretrained else []))
    run = tmp_path / "run"
    cfg = train.load_config(run)
    if pretrained:
        original, tokenizer = source.state_dict(), data.load_tokenizer(tmp_path / "ckpt")
        dev = data.encode_examples(data.read_split(data.get_task("cola"), "dev", glue), tokenizer, cfg.max_len)
        dev = list(data.batches(dev, 16, tokenizer.pad_id))
        want = train.evaluate(source, dev, data.get_task("cola"), cfg, torch.device("cpu"))["loss"]
        assert history[0]["dev_loss"] == pytest.approx(want, rel=1e-5)
    else:
        original = train.build_model(cfg, data.load_tokenizer(run / "tokenizer"), 2).state_dict()
    adapter = torch.load(run / "adapter_model.bin")
    scale = json.loads((run / "adapter_config.json").read_text())
    scale = scale["lora_alpha"] / scale["r"]
    merged = torch.load(run / "merged.pt")
    to_hf = train.hf_name(cfg, source)  # --pretrained: merged.pt has the checkpoint's own names
    assert set(merged) == {to_hf(key) for key in original}
    merged = {key: merged[to_hf(key)] for key in original}
    rename = _module_name(cfg, source)  # the names the adapter is saved under
    for key, W0 in original.items():
        module, _, param = key.rpartition(".")
        prefix = "base_model.model." + rename(module)
        if f"{prefix}.lora_A.weight" in adapter and param == "weight":
            A, B = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
            assert A.shape[0] == 2 * cfg.rank
            torch.testing.assert_close(W0 + scale * B @ A, merged[key], atol=1e-5, rtol=0)
        elif f"{prefix}.{param}" in adapter:  # head and word embeddings: trained whole
            torch.testing.assert_close(adapter[f"{prefix}.{param}"], merged[key])
        else:
            torch.testing.assert_close(W0, merged[key], atol=0, rtol=0)


# torchrun runs this instead of train.py: the same run, and every rank saves its trained parameters
# (rank<r>.pt in --out) just before train.py ends the process group.
_RANK_WEIGHTS = """
import os, sys
import torch
import train

made = []


class Recorded(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)


def save_then_end(end=torch.distributed.destroy_process_group):
    trained = {k: v.detach() for k, v in made[0].module.named_parameters() if v.requires_grad}
    torch.save(trained, os.path.join(sys.argv[sys.argv.index("--out") + 1], f"rank{os.environ['RANK']}.pt"))
    end()


torch.nn.parallel.DistributedDataParallel = Recorded
torch.distributed.destroy_process_group = save_then_end
train.main(sys.argv[1:])
"""


def test_tiny_encoder_trains_and_exports_its_word_embeddings(tmp_path, glue):
    _train(tmp_path, "--init", "lora", "--epochs", "1")
    _train(tmp_path, "--init", "lora", "--epochs", "1", "--freeze_embeddings", out="frozen")
    cfg = train.load_config(tmp_path / "run")
    original = train.build_model(cfg, data.load_tokenizer(tmp_path / "run" / "tokenizer"), 2).state_dict()
    key = "word_embeddings.weight"
    for run, trains in (("run", True), ("frozen", False)):
        adapter = torch.load(tmp_path / run / "adapter_model.bin")
        saved = json.loads((tmp_path / run / "adapter_config.json").read_text())["modules_to_save"]
        weights = torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"][key]
        assert ("word_embeddings" in saved) is trains and {"head.dense", "head.out_proj"} <= set(saved)
        assert torch.equal(weights, original[key]) is not trains
        if trains:  # the export holds what was trained
            assert torch.equal(adapter["base_model.model." + key], weights)
        else:
            assert "base_model.model." + key not in adapter
    assert train.trainable_modules(train.Config(pretrained="DIR")) == ["head"]  # pretrained: frozen


def test_train_downloads_a_missing_task(tmp_path, server, monkeypatch, capsys):
    base, files = server
    source = _glue_fixture(tmp_path / "source")
    archive = _zip({f"CoLA/{f}": (source / "CoLA" / f).read_text() for f in ("train.tsv", "dev.tsv")})
    files["/CoLA.zip"] = (archive, len(archive))
    monkeypatch.setenv("GLUE_URL", base)
    cola = dataclasses.replace(data.get_task("cola"), rows=(96, 32))  # the fixture's rows, not GLUE's
    monkeypatch.setattr(data, "_TASKS", [cola if t.name == "cola" else t for t in data._TASKS])
    history = _train(tmp_path, "--epochs", "1")  # --data_dir tmp_path/glue, which does not exist
    assert [h["epoch"] for h in history] == [0, 1]
    assert os.listdir(tmp_path / "glue") == ["CoLA"]
    assert f"downloading {base}/CoLA.zip" in capsys.readouterr().out
    del files["/CoLA.zip"]
    (tmp_path / "kept").mkdir()
    for folder in ("kept", "new/glue"):  # a data dir that exists is left as it was, one made goes
        with pytest.raises(SystemExit) as e:
            train.main(["--data_dir", str(tmp_path / folder), "--out", str(tmp_path / "failed")])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: could not fetch")
        assert "HTTP Error 404" in err[0] and "To get CoLA by hand" in err[0]
    assert os.listdir(tmp_path / "kept") == [] and not (tmp_path / "new").exists()
    assert not (tmp_path / "failed").exists()


def test_data_missing_partial_or_misplaced_ends_in_one_line_and_leaves_nothing(tmp_path, glue, capsys):
    """A file as the data dir, the task's own folder as the data dir, a task folder without its train
    file (not announced as a download): one error line each, nothing written."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "partial" / "CoLA").mkdir(parents=True)
    (tmp_path / "partial" / "CoLA" / "dev.tsv").write_text((glue / "CoLA" / "dev.tsv").read_text())
    cases = {"file": "the data dir {d} is a file: point --data_dir",
             "glue/CoLA": "the data dir {d} holds a train.tsv itself: if it is CoLA's folder, pass "
                          "its parent, {p}",
             "partial": "{d}/CoLA exists but lacks train.tsv: complete it or remove it"}
    before = sorted(str(f) for f in tmp_path.rglob("*"))
    for folder, want in cases.items():
        d = glue / "CoLA" if folder == "glue/CoLA" else tmp_path / folder
        line = _refused(capsys, ["--data_dir", str(d), "--out", str(tmp_path / "run")])
        assert line.startswith("error: " + want.format(d=d, p=d.parent)), line
        assert "downloading" not in capsys.readouterr().out
    assert sorted(str(f) for f in tmp_path.rglob("*")) == before


def test_data_unreadable_unwritable_or_not_text_ends_in_one_line_and_leaves_nothing(tmp_path, glue, capsys,
                                                                                     monkeypatch):
    """A train file this user may not read, a data dir it may not write when the task must be downloaded
    (not announced as a download), a train file that is not text: one error line naming the path, nothing
    written. chmod does not stop root, so as root the OS's refusal is raised where the OS would raise it."""
    train_tsv, empty = glue / "CoLA" / "train.tsv", tmp_path / "empty"
    empty.mkdir()
    train_tsv.chmod(0)
    empty.chmod(0o555)
    if os.access(train_tsv, os.R_OK):  # root
        def refuse(real, path):  # open(path, ...) or mkdtemp(..., dir=path) as the OS refuses them
            def call(*args, **kwargs):
                if str(args[0] if args else kwargs["dir"]) == str(path):
                    raise PermissionError(13, "Permission denied", str(path))
                return real(*args, **kwargs)
            return call
        monkeypatch.setattr(data, "open", refuse(open, train_tsv), raising=False)
        monkeypatch.setattr(data.tempfile, "mkdtemp", refuse(data.tempfile.mkdtemp, empty))
    before = sorted(str(f) for f in tmp_path.rglob("*"))
    for d, path in ((glue, train_tsv), (empty, empty)):
        line = _refused(capsys, ["--data_dir", str(d), "--out", str(tmp_path / "run")])
        assert line == (f"error: {path}: Permission denied: give this user the access train.py needs (chmod, "
                        "chown), or pass another --data_dir, --pretrained or --out"), line
        assert "downloading" not in capsys.readouterr().out
    assert sorted(str(f) for f in tmp_path.rglob("*")) == before
    monkeypatch.undo()
    train_tsv.chmod(0o644)
    train_tsv.write_bytes(b"src\t1\t\t\xd0\xa0ok\n" + b"src\t0\t*\t\xff bad\n")  # byte 20: not UTF-8
    line = _refused(capsys, ["--data_dir", str(glue), "--out", str(tmp_path / "run")])
    assert line == (f"error: {train_tsv} is not UTF-8 text (invalid start byte at byte 20): is it GLUE's "
                    f"CoLA/train.tsv? Restore it (delete {glue / 'CoLA'} and run again: train.py downloads it)")
    assert not (tmp_path / "run").exists()


def test_torchrun_two_processes_match_one(tmp_path, glue):
    """Two processes with batch 8 each against one process with batch 16: 2 steps of cg-lora on a
    --pretrained checkpoint with dropout 0. data.batches cuts one shuffled order into batches, so rank r's
    s-th batch (batch 2s + r) is half of the one process's s-th batch, and the mean of the two ranks'
    mean-loss gradients is its gradient: the runs must agree. Asserted: the calibration statistics
    summed over the ranks give one process's init (B A to 1e-3: fp32 summation order, amplified by the
    whitening); after the steps both ranks hold identical weights, and these equal the one process's
    to 1% of how far the steps moved them (B A and the head; measured: at most 0.13%; ranks that do not
    split the batches, and so step on other data, are off by about 50%)."""
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    common = ["--task", "cola", "--data_dir", str(glue), "--pretrained", str(tmp_path / "ckpt"), "--calib_batches", "4",
              "--calib_batch_size", "8", "--max_steps", "2", "--log_every", "1000", "--damping", "1",
              "--diagnostics"]
    # a fixed damping: at the small one these fixtures choose, the exact top r turns over under fp32 noise
    (tmp_path / "rank_weights.py").write_text(_RANK_WEIGHTS)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=here)
    one = subprocess.run([sys.executable, "train.py", *common, "--batch_size", "16", "--out", str(tmp_path / "one")],
                         cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "rank_weights.py"), *common, "--batch_size", "8", "--out", str(tmp_path / "two")],
                         cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-1000:] + two.stderr[-3000:]  # includes train.py's check that both ranks agree
    assert "2 process(es)" in two.stdout
    cfg = train.load_config(tmp_path / "one")
    model = from_pretrained(str(tmp_path / "ckpt"), 2)
    rename = _module_name(cfg, model)  # ours -> the checkpoint's names the adapter is saved under
    ours = {rename(n): n for n in {k.rpartition(".")[0] for k in hf_names(model.config)}}

    def our_name(key):  # base_model.model.<their module>.lora_A.weight -> <our module>.lora_A, and so on
        module, _, param = key.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
        if param.startswith("lora_"):
            return f"{ours[module]}.{param}"
        module, _, param = key.removeprefix("base_model.model.").rpartition(".")
        return f"{ours[module]}.{param}"

    init = [{our_name(k): v for k, v in torch.load(tmp_path / run / "adapter_init" / "adapter_model.bin").items()}
            for run in ("one", "two")]
    records = [json.loads((tmp_path / run / "init.json").read_text())["layers"] for run in ("one", "two")]
    for r1, r2 in zip(*records):  # the per-fold statistics too: the same calibration diagnostics
        for key in ("heldout", "heldout_lora_one", "insample", "overlap_left", "overlap_right", "captured"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-3), key
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    trained = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    assert len(ranks[0]) == 12 and all(torch.equal(w, ranks[1][k]) for k, w in ranks[0].items())

    def update(weights, name):  # an adapter's B A (fp noise may flip the sign of a column of B and the row of
        # A: B A and Adam's steps are unchanged by that), or a head parameter
        return weights[name + ".lora_B"] @ weights[name + ".lora_A"] if name + ".lora_A" in weights else weights[name]

    adapters = sorted({k.split(".lora_")[0] for k in ranks[0] if ".lora_" in k})
    for name in adapters:  # the statistics summed over the ranks: one process's init
        d1, d2 = update(init[0], name), update(init[1], name)
        assert (d1 - d2).norm() < 1e-3 * d1.norm(), (name, ((d1 - d2).norm() / d1.norm()).item())
    for name in adapters + [k for k in ranks[0] if k.startswith("head.")]:  # the steps: one process's steps
        moved = (update(trained, name) - update(init[0], name)).norm()
        assert (update(ranks[0], name) - update(trained, name)).norm() < 1e-2 * moved, name


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@pytest.mark.parametrize("flags,message", [
    (["--task", "colaa"], "unknown GLUE task"),
    (["--init", "pissa"], "--init 'pissa'"),
    (["--rank", "0"], "--rank must be positive"),
    (["--rank", "100000"], "--rank 100000: cg-lora needs rank <= the smallest side of each target, and layers.0.query "
                           "is (128, 128): pass --rank 128 or less"),
    (["--init", "lora-ga", "--rank", "100"], "lora-ga needs 2 x rank"),
    (["--targets", "nosuchlayer"], "--targets nosuchlayer: targets ['nosuchlayer'] match no Linear layer"),
    (["--targets", "query,,value"], "--targets 'query,,value'"),
    (["--damping", "-1"], "--damping takes a number > 0 or auto, got '-1'"),
    (["--damping", "0"], "--damping takes a number > 0 or auto, got '0'"),
    (["--damping", "high"], "--damping takes a number > 0 or auto"),
    (["--balance", "nosuch"], "--balance 'nosuch': choose from euclidean, curvature"),
    (["--fisher", "exact"], "--fisher 'exact': choose from empirical, sampled"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--calib_batches", "1", "--diagnostics"], "--calib_batches 1: cg-lora needs a batch per fold (2)"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--warmup", "2"], "--warmup must be in [0, 1]"),
    (["--max_len", "2"], "--max_len 2 leaves no room for text: cola examples take 2 special tokens: pass --max_len 3"),
    (["--task", "sts-b", "--max_len", "4"], "sts-b examples take 3 special tokens: pass --max_len 5 or more"),
    pytest.param(["--device", "cuda"], "--device cuda: this torch sees no CUDA device", marks=_NO_CUDA),
    pytest.param(["--bf16"], "--bf16 autocasts on CUDA only", marks=_NO_CUDA),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--resume"], "--resume: there is no run in {run} (no such directory, or an empty one): check --out, "
                   "or start the run without --resume"),
    (["--data_dir", "MISSING"], "train.tsv"),
    (["--pretrained", "NOWEIGHTS"], "model.safetensors"),
    (["--batch_size", "1000"], "lower --batch_size"),
])
def test_train_bad_input_is_one_line_exit_2(tmp_path, glue, capsys, flags, message):
    """Each bad flag: one error line naming the flag (train.py's, not an internal name), exit 2, no traceback
    and no file in the run directory."""
    (tmp_path / "NOWEIGHTS").mkdir()
    (tmp_path / "NOWEIGHTS" / "config.json").write_text(json.dumps(dict(
        model_type="bert", vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=32)))
    flags = [str(tmp_path / f) if f in ("MISSING", "NOWEIGHTS") else f for f in flags]
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", str(glue), "--out", str(tmp_path / "run"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message.format(run=tmp_path / "run") in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error") or ": error:" in line]) == 1
    assert not (tmp_path / "run").exists()


def test_torchrun_on_gpus_puts_each_process_on_its_own_gpu_with_nccl(tmp_path, monkeypatch):
    """Under torchrun on a CUDA machine (simulated: no GPU here) rank 1 takes cuda:1 as its current
    device and nccl with device_id, --device auto included; without CUDA, the CPU and gloo."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 1)
    for flag in ("cuda", "auto"):
        calls.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        run = train.start(train.Config(device=flag, out=str(tmp_path / flag)))[0]
        gpu = torch.device("cuda", 1)
        assert run.device == gpu and run.rank == 1
        assert calls == [("set_device", gpu), ("init", ("nccl",), dict(device_id=gpu))]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.start(train.Config(out=str(tmp_path / "cpu")))[0].device == torch.device("cpu")
    assert calls == [("init", ("gloo",), dict(device_id=None))]


def test_resume_says_which_random_states_it_restored(monkeypatch):
    cpu = torch.get_rng_state()
    expected = torch.rand(3)
    cuda = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: cuda.append(d))
    assert train.restore_rng([cpu], torch.device("cpu")) == "resume: restored the CPU random state"
    assert torch.equal(torch.rand(3), expected)  # restored indeed
    assert "CUDA state is unused" in train.restore_rng([cpu, cpu], torch.device("cpu")) and not cuda
    assert "draws start afresh" in train.restore_rng([cpu], torch.device("cuda", 0)) and not cuda
    assert "CPU and CUDA" in train.restore_rng([cpu, cpu], torch.device("cuda", 0))
    assert cuda == [torch.device("cuda", 0)]


def test_exports_of_a_model_on_an_accelerator_hold_cpu_tensors(tmp_path):
    """adapter_init/, adapter_model.bin and merged.pt load with a plain torch.load anywhere."""
    cfg = train.Config(init="cg-lora", rank=2, alpha=4)
    with _Accelerator():
        model = models.Encoder(models.tiny_config(30, 2)).to(_ACCELERATOR)
        cglora.add_lora(model, ["query", "value"], 2, 4, rslora=True, trainable=train.trainable_modules(cfg))
        exports = [cglora.lora_state_dict(model), train.merged_state_dict(cfg, model)]
        train.export_adapter(cfg, model, tmp_path)
    exports.append(torch.load(tmp_path / "adapter_model.bin"))
    for state in exports:
        assert state and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())


def test_docs_recipe_opens_a_tiny_run_in_peft_with_our_logits(tmp_path, glue, monkeypatch):
    """docs/train.md's recipe, run as written on a run directory: peft gives the trained model's logits."""
    peft = pytest.importorskip("peft")  # noqa: F841
    _train(tmp_path, "--init", "cg-lora-shift", "--epochs", "1")
    text = (Path(_HERE) / "docs" / "train.md").read_text()
    block = next(b.split("```")[0] for b in text.split("```python\n")[1:] if "PeftModel" in b.split("```")[0])
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec("\n".join(line.removeprefix("  ") for line in block.splitlines()).replace(
        '"runs/cola-tiny-cg-lora-r8-query+value-s0"', repr(str(tmp_path / "run"))), scope)
    cfg = train.load_config(tmp_path / "run")
    ours = train.build_model(cfg, data.load_tokenizer(tmp_path / "run" / "tokenizer"), 2)
    add_lora(ours, ["query", "value"], cfg.rank, cfg.alpha, rslora=True, trainable=train.trainable_modules(cfg))
    ours.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"])
    ids = torch.randint(5, ours.config.vocab_size, (3, 9))
    with torch.no_grad():
        want, got = ours.eval()(ids, torch.ones_like(ids)), scope["model"](ids, torch.ones_like(ids))
    assert (got - want).abs().max() <= 1e-5 and ours.layers[0].query.lora_A0.any()  # shifted: rank 2r in peft
