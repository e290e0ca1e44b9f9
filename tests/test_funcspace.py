"""Proves results/funcspace.py's measurements against brute force on a tiny model."""
import math

import pytest
import torch

import cglora
import models
from conftest import _pretrained_checkpoint, _results_sandbox
from results import common, early, funcspace, grid


def _model(classes=3, seed=0):  # a 2-block encoder, 16 wide, in fp64 so that finite differences are exact enough
    torch.manual_seed(seed)
    config = models.EncoderConfig(vocab_size=13, hidden=16, layers=2, heads=2, intermediate=32, num_labels=classes)
    return models.Encoder(config).double().eval()


def _batches(seed=0, sizes=(3, 2), classes=3):  # padded token batches with labels
    g, out = torch.Generator().manual_seed(seed), []
    for n in sizes:
        lengths = torch.randint(2, 7, (n,), generator=g)
        mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
        ids = torch.randint(1, 13, mask.shape, generator=g) * mask
        out.append(dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, classes, (n,), generator=g)))
    return out


NAMES = ["layers.0.query", "layers.1.value"]


def _outputs(model, batches, deltas=None, h=0.0):  # the outputs with each named weight moved by h D
    saved = {n: model.get_submodule(n).weight.detach().clone() for n in NAMES}
    try:
        with torch.no_grad():
            for n, D in (deltas or {}).items():
                model.get_submodule(n).weight.add_(h * D)
            return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}) for b in batches])
    finally:
        with torch.no_grad():
            for n, W in saved.items():
                model.get_submodule(n).weight.copy_(W)


def test_output_change_is_the_finite_difference_of_each_update():
    """J D (forward-mode, vmapped over K updates) equals the central difference (f(W + hD) - f(W - hD)) / 2h
    for each D, and is linear in D (a second update, twice the first, gives twice the change)."""
    run, model, batches = funcspace, _model(), _batches()
    g = torch.Generator().manual_seed(1)
    D1 = {n: torch.randn(16, 16, generator=g, dtype=torch.float64) for n in NAMES}
    D2 = {n: torch.randn(16, 16, generator=g, dtype=torch.float64) for n in NAMES}
    changes = run.output_change(model, [D1, D2, {n: 2 * D for n, D in D1.items()}], batches)
    assert changes.shape == (3, 5, 3)
    h = 1e-5
    for D, c in zip((D1, D2), changes):
        brute = (_outputs(model, batches, D, h) - _outputs(model, batches, D, -h)) / (2 * h)
        assert c.abs().max() > 1e-3 and torch.allclose(c, brute, rtol=1e-6, atol=1e-8)
    assert torch.allclose(changes[2], 2 * changes[0]) and not torch.allclose(changes[0], changes[1])
    assert not model.training  # eval mode restored as found


def test_jacobian_of_a_training_step_predicts_its_output_change():
    """J applied to the target layers' update of one SGD step of full fine-tuning equals the output change
    that update alone makes, to first order: the error shrinks as h^2 (h: a multiple of the step)."""
    run, model, batches = funcspace, _model(), _batches()
    model.train()
    loss = sum(common.loss(model(**{k: v for k, v in b.items() if k != "labels"}), b["labels"]) for b in batches)
    grads = torch.autograd.grad(loss, [model.get_submodule(n).weight for n in NAMES])
    model.eval()
    lr = 1 / math.sqrt(sum(gr.square().sum() for gr in grads))  # a step of norm 1 (the gradient is ~1e-6)
    dW = {n: -lr * gr for n, gr in zip(NAMES, grads)}  # the step's update of the two target layers
    Jd = run.output_change(model, [dW], batches)[0]
    base = _outputs(model, batches)
    errors = [(_outputs(model, batches, dW, h) - base - h * Jd).norm().item() for h in (0.1, 0.05)]
    assert Jd.norm() > 1e-3 and errors[1] < errors[0] / 3  # second order: / 4 when h halves
    assert errors[0] < 0.05 * (0.1 * Jd).norm()


def test_explained_is_the_best_multiple_found_by_brute_force():
    """explained(y, c) = 1 - min_a |y - a c|^2 / |y|^2: against least squares and a grid over a; and it is
    the squared cosine, whatever the sign of the cosine."""
    run, g = funcspace, torch.Generator().manual_seed(2)
    for _ in range(3):
        y, c = torch.randn(7, 2, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64)
        a = torch.linalg.lstsq(c.reshape(-1, 1), y.reshape(-1, 1)).solution.item()
        best = 1 - (y - a * c).square().sum().item() / y.square().sum().item()
        grid = max(1 - (y - t * c).square().sum().item() / y.square().sum().item()
                   for t in torch.linspace(-5, 5, 20001).tolist())
        assert run.explained(y, c) == pytest.approx(best, abs=1e-12)
        assert run.explained(y, c) == pytest.approx(grid, abs=1e-6)
        assert run.explained(y, c) == pytest.approx(run.cosine(y, c) ** 2, abs=1e-12)
        assert run.explained(y, -c) == pytest.approx(run.explained(y, c)) and run.cosine(y, -c) == -run.cosine(y, c)
    assert run.cosine(y, 3 * y) == pytest.approx(1.0) and run.explained(y, 3 * y) == pytest.approx(1.0)


def _statistics(seed=3, d_out=6, d_in=5):  # G, and S, T positive semidefinite of rank 2 (damping matters)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, 2, generator=g, dtype=torch.float64)
    Y = torch.randn(d_out, 2, generator=g, dtype=torch.float64)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64), X @ X.T, Y @ Y.T


@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_newton_step_is_the_dense_kfac_newton_step(damping):
    """newton_step = -T_l^-1 G S_l^-1 with explicit inverses of S + l (tr S / d) I and T + l (tr T / d) I, and
    CG-LoRA's direction at full rank is that step (so the rank-r direction is its truncation)."""
    run = funcspace
    G, S, T = _statistics()
    S_l = S + damping * S.trace() / 5 * torch.eye(5, dtype=torch.float64)
    T_l = T + damping * T.trace() / 6 * torch.eye(6, dtype=torch.float64)
    dense = -torch.linalg.inv(T_l) @ G @ torch.linalg.inv(S_l)
    step = run.newton_step(G, S, T, damping)
    assert torch.allclose(step.double(), dense, rtol=1e-4, atol=1e-6 * dense.abs().max())
    B, A = cglora.cg_lora_factors(G.float(), S.float(), T.float(), 5, damping)[:2]
    assert torch.allclose((B @ A).double(), dense, rtol=1e-3, atol=1e-4 * dense.abs().max())


def test_init_directions_are_what_init_adapters_writes():
    """The item-1 directions of CG-LoRA (at a fixed damping), LoRA-One and LoRA-GA equal the update s B A
    that init_adapters writes into a model from the same statistics; random and CG-LoRA have LoRA-One's
    spectral norm per layer."""
    run, batches = funcspace, _batches()
    rank, alpha = 2, 4.0
    model = _model().float()
    stats = cglora.collect_statistics(model, {n: model.get_submodule(n) for n in NAMES}, batches)
    got = {d["method"]: D for d, D in run.init_directions(stats, rank, alpha, [1.0], seed=0)}
    for method in ("cg-lora", "lora-one", "lora-ga"):
        model = _model().float()
        layers = cglora.add_lora(model, [n.rsplit(".", 1)[-1] for n in NAMES], rank, alpha,
                                 rslora=cglora.RSLORA[method])
        layers = {n: layers[n] for n in NAMES}
        stats = cglora.collect_statistics(model, {n: m.base for n, m in layers.items()}, batches)
        cglora.init_adapters(layers, stats, method, damping=1.0)
        for n, m in layers.items():
            written = m.delta_weight().detach()
            assert torch.allclose(got[method][n], written, rtol=1e-3, atol=1e-5 * written.abs().max()), (method, n)
    norm = alpha / (math.sqrt(rank) * cglora.LORA_ONE_GAMMA)
    for method in ("cg-lora", "random", "lora-one"):
        for P in got[method].values():
            assert torch.linalg.matrix_norm(P, ord=2).item() == pytest.approx(norm, rel=1e-4)
    assert all(torch.linalg.matrix_rank(P).item() == rank for P in got["random"].values())


@pytest.mark.filterwarnings("ignore::data.RowCountWarning")  # the fixture holds a few GLUE rows
def test_init_row_on_a_tiny_checkpoint(tmp_path, glue, monkeypatch):
    """`funcspace.py run`'s init row after a full fine-tuning run, on a tiny checkpoint: every init
    direction (CG-LoRA at λ 1 and at the searched λ on 2 folds) measured against full fine-tuning's
    change at each k, the share explained the squared cosine."""
    _pretrained_checkpoint(tmp_path / "ckpt", glue)
    _results_sandbox(tmp_path, monkeypatch, "funcspace")
    monkeypatch.setenv("GLUE_DIR", str(glue))
    budget = dict(rank=2, alpha=4, epochs=2, batch_size=8, max_len=16, calib_batches=2,
                  calib_batch_size=8)
    for module in (early, funcspace):
        monkeypatch.setattr(module, "BUDGET", budget)
    monkeypatch.setattr(grid, "best_rates", lambda rows: dict.fromkeys(funcspace.METHODS, 1e-2))
    for name, value in dict(DEV=32, INIT_DEV=16, AT=(0, 1), K=(1,)).items():
        monkeypatch.setattr(funcspace, name, value)
    funcspace.funcspace("cola", "full", 0, str(tmp_path / "ckpt"), steps=3)
    funcspace.init_row("cola", 0, str(tmp_path / "ckpt"), steps=3)
    row = common.read_rows(funcspace.FUNCSPACE)[-1]
    auto = row["damping_auto"]
    assert row["kind"] == "init" and row["ks"] == [1, 3] and auto in cglora.DAMPING_GRID
    labels = [(d["method"], d["damping"]) for d in row["directions"]]
    assert labels[:4] == [("cg-lora", 1.0), ("K-FAC Newton, full rank", 1.0), ("cg-lora", auto),
                          ("K-FAC Newton, full rank", auto)]
    for d in row["directions"]:
        assert set(d["against"]) == {"whole 1", "whole 3", "target layers 1", "target layers 3"}
        for m in d["against"].values():
            assert m["explained"] == pytest.approx(m["cosine"] ** 2, abs=1e-5)


def test_divergence_against_its_definition():
    """KL(full || other) = mean_i sum_c p_ic log(p_ic / q_ic) of the softmax, argmax agreement; RMSE for
    one output."""
    run = funcspace
    full, other = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.5]], [[0.0, 1.0], [0.0, 2.0], [3.0, 1.0]]
    kl = 0.0
    for a, b in zip(full, other):
        p = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        q = [math.exp(x) / sum(math.exp(y) for y in b) for x in b]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 3
    got = run.divergence(full, other)
    assert got["kl"] == pytest.approx(kl) and got["agreement"] == pytest.approx(1 / 3)
    assert run.divergence(full, full) == dict(kl=0.0, agreement=1.0)
    assert run.divergence([[1.0], [2.0]], [[2.0], [4.0]])["rmse"] == pytest.approx(math.sqrt(2.5))


def test_funcspace_report_pairs_each_method_with_full_fine_tuning_of_its_seed(tmp_path, monkeypatch):
    """The report's distance is to full fine-tuning's outputs of the same seed and step; the block and figure
    are written into results/README.md (created with the block if absent)."""
    run, here = funcspace, _results_sandbox(tmp_path, monkeypatch, "other")
    (here / "README.md").unlink()
    for seed in (0, 1):
        for method, shift in (("full", 0.0), ("rslora", 0.1 * (seed + 1))):  # rslora: RMSE 0.1, 0.2
            common.append_row(run.FUNCSPACE, dict(kind="train", task="sts-b", method=method, seed=seed, steps=10,
                                               dev_examples=2, outputs={str(k): [[k + seed + shift], [seed - shift]]
                                                                        for k in (0, 10)}))
    run.report()
    readme = (here / "README.md").read_text()
    assert "<!-- funcspace -->" in readme and "| rslora | 0.150 ± 0.050 (2) | 0.150 ± 0.050 (2) |" in readme
    assert (here / "funcspace_sts-b_10.svg").read_text().startswith("<svg")  # not the default length
    run.report()  # a second report replaces the block
    assert (here / "README.md").read_text() == readme


def test_steps_end_is_the_last_step_of_train_pys_schedule(tmp_path, monkeypatch):
    # CoLA's train.tsv has no header: 100 rows, batch 32, 2 epochs -> 3 whole batches an epoch
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("".join(f"src\t{i % 2}\t\tsentence {i} .\n" for i in range(100)))
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    run = funcspace
    with pytest.warns(UserWarning):  # a file with another row count than GLUE's says so
        assert run.schedule_end("cola") == 100 // 32 * 2 == 6
    assert run.schedule_end("cola", glue=True) == 8551 // 32 * 2
