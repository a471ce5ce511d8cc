"""``saef reproduce baselines``: SAEF beside the modern baselines, each at its own best learning rate.

Two problems, every run one ``saef train`` (see :mod:`saef.studies.reproduce`):

* MNIST-1D / 1-D CNN, K = 8, double-way, momentum 0.9, one lr schedule for all: full-precision SGDM; EF,
  SAEF (p = never and p = 10) and EF21-SGDM with top-k 1 %, scaled sign, PowerSGD rank 1 and rank 2; and
  compressed SGD without feedback ("direct") with QSGD (4 levels). Each method runs an lr grid with seed 0;
  the lr with the best final accuracy on 1000 training samples held out of training (``--holdout``) is then
  run with the other seeds, and reported with its test accuracy over all seeds -- no method is judged at
  another's tuned lr.
* a9a logistic regression with the non-convex regulariser (``--dataset libsvm --model logreg``), full
  batch, K = 20, single-way (the uplink is what is compressed, as in the EF21 papers): EF, SAEF and EF21
  with top-k at k = 1 (1 %) and k = 12 (10 %), momentum 0 and 0.9, and direct rand-k (unbiased) at the same
  k; the lr with the smallest final ||grad f||^2 (of seed 0) is reported. Gradient descent is
  deterministic, so only rand-k runs the other seeds (at its chosen lr).

Two phases, so the grid costs one seed: :func:`plan` is the grid with seed 0, :func:`confirm` the other
seeds at each method's chosen lr (run after the first phase has finished).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..app.plots import mean_std, save_figure, traffic_bits

__all__ = ["plan", "confirm", "select", "report"]

# lr grids, widened twice after passes that put methods' best lr on an edge (momentum 0.9 multiplies the
# effective step of gradient descent by 10, so a9a's grid spans four decades)
MNIST_LRS = (0.003, 0.01, 0.03, 0.1, 0.3)
A9A_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
A9A_RANDK_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
A9A_STEPS = 300
COMPRESSORS = ("topk:0.01", "sign", "powersgd:1", "powersgd:2")


def mnist_methods() -> List[Tuple[str, str, Optional[int]]]:
    """(method, compressor, p) of the MNIST-1D comparison."""
    methods = [("sgd", "identity", None)]
    for c in COMPRESSORS:
        methods += [("ef", c, None), ("saef", c, None), ("saef", c, 10), ("ef21", c, None)]
    return methods + [("direct", "qsgd:4", None)]


def plan(make_run, base: Dict[str, object], seeds: int, libsvm_file: Optional[str]) -> list:
    """The first phase: ``make_run(**settings)`` for every method and lr of the grid, seed 0 (a9a only if
    ``libsvm_file``). ``seeds`` is for :func:`confirm`."""
    runs = []
    mnist = {**base, "workers": 8, "double_way": True, "momentum": 0.9, "holdout": 1000}
    for method, compressor, p in mnist_methods():
        for lr in MNIST_LRS:
            settings = {**mnist, "method": method, "compressor": compressor, "average_every": p, "lr": lr, "seed": 0}
            if method == "sgd":
                settings["double_way"] = False
            runs.append(make_run(**settings))
    if libsvm_file is None:
        return runs
    a9a = dict(dataset="libsvm", data_file=str(libsvm_file), model="logreg", workers=20, full_batch=True, double_way=False,
               weight_decay=0.0, epochs=A9A_STEPS, lr_milestones=[10 * A9A_STEPS], batch_size=20, device="cpu")
    for mu in (0.0, 0.9):
        for rho in ("0.01", "0.1"):
            for method in ("ef", "saef", "ef21"):
                runs += [make_run(**a9a, method=method, compressor=f"topk:{rho}", momentum=mu, lr=lr, seed=0) for lr in A9A_LRS]
            runs += [make_run(**a9a, method="direct", compressor=f"randk:{rho}:unbiased", momentum=mu, lr=lr, seed=0)
                     for lr in A9A_RANDK_LRS]
    return runs


def confirm(make_run, first: Sequence, seeds: int, runs_dir: Path, read_rows) -> list:
    """The second phase: the other seeds (1 .. seeds - 1) of each method at the lr its seed 0 chose; none
    for deterministic gradient descent (a9a without a random compressor)."""
    runs = []
    for v in select(first, runs_dir, read_rows).values():
        config = v["config"]
        if config["dataset"] == "libsvm" and not config["compressor"].startswith("randk"):
            continue
        runs += [make_run(**{**config, "seed": seed}) for seed in range(1, seeds)]
    return runs


# --- reading the runs ------------------------------------------------------------------------------
def _key(config: Dict[str, object]) -> tuple:
    """What identifies a method (everything but the lr and the seed)."""
    return tuple((k, config[k]) for k in ("dataset", "method", "compressor", "average_every", "momentum"))


def _label(config: Dict[str, object]) -> str:
    method = {"sgd": "SGDM (fp32)", "ef": "EF", "saef": "SAEF", "ef21": "EF21-SGDM" if config["momentum"] else "EF21",
              "direct": "direct"}[config["method"]]
    if config["method"] == "saef":
        method += f" p={config['average_every'] or '∞'}"
    compressor = "" if config["method"] == "sgd" else f" {config['compressor']}"
    mu = f", mu={config['momentum']:g}" if config["dataset"] == "libsvm" else ""
    return method + compressor + mu


def _score(rows: Optional[List[dict]], dataset: str) -> float:
    """Higher is better: the final held-out accuracy (MNIST-1D), or minus the final ||grad f||^2 (a9a). A run
    that did not finish (it diverged: saef train stops on repeated NaN steps) scores lowest: accuracy 0, or
    minus infinity."""
    if not rows:
        return -math.inf if dataset == "libsvm" else 0.0
    last = rows[-1]
    if dataset == "libsvm":
        value = last.get("grad_norm_sq")
        return -math.inf if value is None or not math.isfinite(value) else -value
    return last.get("val_acc") or 0.0


def select(runs: Sequence, runs_dir: Path, read_rows) -> Dict[tuple, dict]:
    """Per method: the lr with the best score of seed 0 (a run that diverged scores lowest), the finished
    runs' rows at that lr (every seed), how many of its seeds failed, and every lr's seed-0 score.
    ``read_rows(run_dir)`` gives a finished run's rows, or None."""
    by_method: Dict[tuple, Dict[float, List[Tuple[dict, Optional[List[dict]]]]]] = {}
    for run in runs:
        config = run.config
        by_method.setdefault(_key(config), {}).setdefault(config["lr"], []).append((config, read_rows(runs_dir / run.name)))
    chosen = {}
    for key, by_lr in by_method.items():
        scores = {lr: _score(next((rows for config, rows in seeds if config["seed"] == 0), None), dict(key)["dataset"])
                  for lr, seeds in by_lr.items()}
        best = max(scores, key=lambda lr: (scores[lr], -lr))
        finished = [rows for _, rows in by_lr[best] if rows]
        chosen[key] = {"lr": best, "scores": scores, "config": by_lr[best][0][0], "seeds": finished,
                       "failed": len(by_lr[best]) - len(finished)}
    return chosen


def _megabytes(row: dict, uplink_only: bool = False) -> float:
    """Traffic per worker so far in MB: everything sent and received (:func:`saef.app.plots.traffic_bits`),
    or the uplink only."""
    return (row["bits_up"] if uplink_only else traffic_bits(row) or 0.0) / 8e6


def _at_budget(rows: List[dict], budget_mb: float) -> float:
    """Test accuracy at the last epoch whose cumulative traffic is within ``budget_mb`` (the first epoch's
    if even that is over)."""
    within = [r for r in rows if _megabytes(r) <= budget_mb * (1 + 1e-9)]
    return (within[-1] if within else rows[0])["test_acc"]


def mnist_markdown(chosen: Dict[tuple, dict]) -> str:
    mnist = {k: v for k, v in chosen.items() if dict(k)["dataset"] != "libsvm"}
    if not mnist:
        return ""
    budget = min(_megabytes(v["seeds"][0][-1]) for k, v in mnist.items() if dict(k)["method"] != "sgd" and v["seeds"])
    lines = [f"| method | lr (chosen on held-out) | held-out acc. per lr, seed 0 (%) | test acc. (%) | MB per worker | test acc. at {budget:.2f} MB (%) |",
             "|---|---:|---|---:|---:|---:|"]
    for key, v in sorted(mnist.items(), key=lambda kv: -np.mean([rows[-1]["test_acc"] for rows in kv[1]["seeds"]] or [0])):
        seeds = v["seeds"]
        per_lr = ", ".join(f"{lr:g}: {100 * s:.1f}" for lr, s in sorted(v["scores"].items()))
        if not seeds:
            lines.append(f"| {_label(v['config'])} | – | {per_lr} | diverged at every lr | – | – |")
            continue
        failed = f" ({v['failed']} seed(s) diverged)" if v["failed"] else ""
        lines.append(f"| {_label(v['config'])} | {v['lr']:g} | {per_lr} | {mean_std([r[-1]['test_acc'] for r in seeds], 100)}{failed} "
                     f"| {_megabytes(seeds[0][-1]):.2f} | {mean_std([_at_budget(r, budget) for r in seeds], 100)} |")
    return "\n".join(lines)


def a9a_markdown(chosen: Dict[tuple, dict]) -> str:
    a9a = {k: v for k, v in chosen.items() if dict(k)["dataset"] == "libsvm"}
    if not a9a:
        return ""
    lines = ["| method | lr (chosen) | final ‖∇f‖² per lr (seed 0) | final ‖∇f‖² (mean over seeds) | final f | uplink MB per worker | seeds |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for key, v in sorted(a9a.items(), key=lambda kv: _label(kv[1]["config"])):
        seeds = v["seeds"]
        per_lr = ", ".join(f"{lr:g}: {-s:.2e}" for lr, s in sorted(v["scores"].items()))
        if not seeds:
            lines.append(f"| {_label(v['config'])} | – | {per_lr} | diverged at every lr | – | – | 0 |")
            continue
        norms = [rows[-1]["grad_norm_sq"] for rows in seeds]
        lines.append(f"| {_label(v['config'])} | {v['lr']:g} | {per_lr} | {np.mean(norms):.3e} "
                     f"| {np.mean([rows[-1]['test_loss'] for rows in seeds]):.5f} | {_megabytes(seeds[0][-1], uplink_only=True):.4f} | {len(seeds)} |")
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------------
def _figure(panels, path: Path, title: str) -> Path:
    """``panels``: (axis title, x label, y label, log-x, log-y, [(label, xs per seed, ys per seed)])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(panels), 4.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, xlabel, ylabel, logx, logy, curves) in zip(axes, panels):
        for index, (label, xs, ys) in enumerate(curves):
            n = min(len(y) for y in ys)
            x, y = np.asarray(xs[0][:n], dtype=float), np.array([v[:n] for v in ys], dtype=float)
            ax.plot(x, y.mean(0), color=f"C{index % 10}", linestyle="-" if index < 10 else "--", label=label)
            if len(ys) > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=f"C{index % 10}", alpha=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log" if logx else "linear")
        ax.set_yscale("log" if logy else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=None)


def figures(chosen: Dict[tuple, dict], out: Path) -> List[Path]:
    made = []
    mnist = [v for k, v in chosen.items() if dict(k)["dataset"] != "libsvm" and v["seeds"]]
    for compressor in COMPRESSORS:
        group = [v for v in mnist if v["config"]["compressor"] in (compressor, "identity", "qsgd:4")]
        if not group:
            continue
        curves_epoch = [(f"{_label(v['config'])}, lr {v['lr']:g}", [[r["epoch"] for r in rows] for rows in v["seeds"]],
                         [[100 * r["test_acc"] for r in rows] for rows in v["seeds"]]) for v in group]
        curves_bits = [(label, [[_megabytes(r) for r in rows] for rows in v["seeds"]], ys)
                       for (label, _, ys), v in zip(curves_epoch, group)]
        made.append(_figure([("test accuracy", "epoch", "test top-1 (%)", False, False, curves_epoch),
                             ("test accuracy against traffic", "MB per worker (up + down + averaging), log", "test top-1 (%)", True, False, curves_bits)],
                            out / f"baselines-mnist1d-{compressor.replace(':', '')}.png",
                            f"MNIST-1D, K=8, double-way, momentum 0.9: {compressor} (each method at its chosen lr; band: min-max over seeds)"))
    a9a = [v for k, v in chosen.items() if dict(k)["dataset"] == "libsvm" and v["seeds"]]
    for mu in (0.0, 0.9):
        group = [v for v in a9a if v["config"]["momentum"] == mu]
        if not group:
            continue
        curves_step = [(f"{_label(v['config'])}, lr {v['lr']:g}", [[r["step"] for r in rows] for rows in v["seeds"]],
                        [[r["grad_norm_sq"] for r in rows] for rows in v["seeds"]]) for v in group]
        curves_bits = [(label, [[8 * _megabytes(r, uplink_only=True) * 1e6 for r in rows] for rows in v["seeds"]], ys)
                       for (label, _, ys), v in zip(curves_step, group)]
        made.append(_figure([("‖∇f(x)‖² against steps", "step", "‖∇f(x)‖², log", False, True, curves_step),
                             ("‖∇f(x)‖² against uplink bits", "bits sent per worker, log", "‖∇f(x)‖², log", True, True, curves_bits)],
                            out / f"baselines-a9a-mu{mu:g}.png",
                            f"a9a logistic regression (non-convex regulariser), K=20, full batch, single-way, momentum {mu:g}"))
    return made


def report(runs: Sequence, runs_dir: Path, out: Path, read_rows) -> Tuple[str, List[Path]]:
    """The Markdown tables and the figures of the study."""
    chosen = select(runs, runs_dir, read_rows)
    out.mkdir(parents=True, exist_ok=True)
    text = "## MNIST-1D, 1-D CNN, K=8, double-way, momentum 0.9 (30 epochs, lr x0.1 after 20)\n\n"
    text += ("Each method at the lr of its grid with the best final accuracy of seed 0 on the 1000 held-out "
             "training samples; test accuracy mean ± std over seeds at that lr; MB per worker counts everything sent and "
             "received (error averaging included); the last column reads each run at the epoch where its "
             "traffic was still within the cheapest compressed method's total.\n\n")
    text += mnist_markdown(chosen) + "\n\n"
    a9a = a9a_markdown(chosen)
    if a9a:
        text += (f"## a9a, logistic regression with the non-convex regulariser, K=20, full batch, single-way "
                 f"({A9A_STEPS} steps)\n\nEach method at the lr of its grid with the smallest final ‖∇f‖² (f on the "
                 f"training set); uplink MB per worker (the downlink is the same dense average for all).\n\n" + a9a + "\n")
    return text, figures(chosen, out)
