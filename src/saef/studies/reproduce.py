"""``saef reproduce``: the paper's experiments (Table 1, Figures 1 and 3) and the studies of SAEF beside the
modern baselines (:mod:`saef.studies.baselines`) and of compressed-momentum Adam (:mod:`saef.studies.adam`),
as sets of independent runs.

    saef reproduce table1 --jobs 2          # MNIST-1D analogue of Table 1 (5 seeds), on a 2-core CPU
    saef reproduce fig1 fig3 --jobs 2
    saef reproduce baselines --jobs 2 --libsvm-file a9a   # EF21, PowerSGD, QSGD, rand-k ... at tuned lrs
    saef reproduce adam --jobs 2            # 1-bit Adam and SAEF-Adam on the byte-level GPT
    saef reproduce loco --jobs 2            # DiLoCo, SparseLoCo-style EF and SAEF-LoCo on the GPT
    saef reproduce loco --workers 4         # ... at one of its K (the report still covers every K run so far)
    saef reproduce table1 --setting paper   # CIFAR-100, ResNet-56, 200 epochs: for a GPU machine

Each run is one ``saef train`` process (:mod:`saef.studies.runs`) with its own directory under ``--runs``
named after its settings, so runs are shared between experiments, finished runs (with ``summary.json``) are
reused, and a run that crashes or is interrupted loses nothing else: it is simply run again next time. The
Markdown tables and PNG figures are then rebuilt from the run directories into ``--out`` (default
``docs/results``). ``baselines`` needs the a9a LIBSVM file (``--libsvm-file``; exit 2 without it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .runs import Run, is_done, read_rows, run_all

__all__ = ["EXPERIMENTS", "SETTINGS", "Run", "plan", "run_all", "main"]


# Per-setting base configuration: what differs between our CPU analogue and the paper.
SETTINGS: Dict[str, Dict[str, object]] = {
    # MNIST-1D, 1-D CNN: minutes on a 2-core CPU. 8000 training samples, batch 128: 62 steps per epoch.
    "mnist1d": dict(dataset="mnist1d", model="cnn1d", lr=0.1, batch_size=128, momentum=0.9, weight_decay=0.0,
                    epochs=30, lr_milestones=[20], device="cpu"),
    # The paper's CIFAR-100 ResNet-56 setting (needs the CIFAR-100 python archive and a GPU).
    "paper": dict(dataset="cifar100", model="resnet56", lr=0.1, batch_size=128, momentum=0.9, weight_decay=5e-4,
                  epochs=200, lr_milestones=[100, 150], device="auto"),
}
# Table 1 is read before the first decay; our analogue trains 15 epochs and decays after 10.
TABLE1_SHORT = {"mnist1d": dict(epochs=15, lr_milestones=[10]), "paper": {}}


def _table1(setting: str, seeds: int) -> List[Run]:
    base = {**SETTINGS[setting], **TABLE1_SHORT[setting], "workers": 8, "double_way": True}
    runs = []
    for rho in (0.01, 0.05, 0.1):
        for method, p in [("ef", None)] + [("saef", p) for p in (None, 40, 20, 10, 5, 1)]:
            for seed in range(seeds):
                runs.append(Run.make(**base, method=method, compressor=f"topk:{rho}", average_every=p, seed=seed))
    return runs


def _fig1(setting: str, seeds: int) -> List[Run]:
    runs = []
    for mu in (0.9, 0.0):  # sign, 4 workers, momentum SGD and plain SGD
        base = {**SETTINGS[setting], "workers": 4, "momentum": mu, "double_way": True}
        for seed in range(seeds):
            runs.append(Run.make(**{**base, "double_way": False}, method="sgd", compressor="identity", seed=seed))
            runs += [Run.make(**base, method=m, compressor="sign", seed=seed) for m in ("ef", "saef")]
    base = {**SETTINGS[setting], "workers": 8}  # top-k 1 %, 8 workers, single- and double-way
    for seed in range(seeds):
        runs.append(Run.make(**base, method="sgd", compressor="identity", double_way=False, seed=seed))
        runs += [Run.make(**base, method=m, compressor="topk:0.01", double_way=dw, seed=seed) for m in ("ef", "saef") for dw in (False, True)]
    return runs


def _fig3(setting: str, seeds: int) -> List[Run]:
    base = {**SETTINGS[setting], "workers": 8, "double_way": True, "compressor": "topk:0.01"}
    return [Run.make(**base, method=m, average_every=p, seed=seed) for m in ("ef", "saef") for p in (None, 10) for seed in range(seeds)]


def _baselines(setting: str, seeds: int, libsvm_file: Optional[str] = None) -> List[Run]:
    from . import baselines

    return baselines.plan(Run.make, SETTINGS[setting], seeds, libsvm_file)


def _adam(setting: str, seeds: int) -> List[Run]:
    from . import adam

    return adam.plan(Run.make, seeds)


def _loco(setting: str, seeds: int, workers: Optional[Sequence[int]] = None) -> List[Run]:
    from . import loco

    return loco.plan(Run.make, seeds, workers)


EXPERIMENTS = {"table1": (_table1, 5), "fig1": (_fig1, 3), "fig3": (_fig3, 3), "baselines": (_baselines, 3), "adam": (_adam, 3),
               "loco": (_loco, 3)}
STUDIES = {"baselines": "baselines", "adam": "adam", "loco": "loco"}  # experiments with their own report (and maybe a second phase)


SWEEPS_WORKERS = ("loco",)  # experiments whose K can be chosen (--workers)


def plan(experiment: str, setting: str = "mnist1d", seeds: Optional[int] = None, libsvm_file: Optional[str] = None,
         workers: Optional[Sequence[int]] = None) -> List[Run]:
    make, default_seeds = EXPERIMENTS[experiment]
    extra = {"libsvm_file": libsvm_file} if experiment == "baselines" else {}
    if experiment in SWEEPS_WORKERS:
        extra["workers"] = workers
    return make(setting, default_seeds if seeds is None else seeds, **extra)


def _mean_std(values: Sequence[float]) -> str:
    """Accuracies as percentages, mean ± std."""
    from ..app.plots import mean_std

    return mean_std(values, 100)


def table1_markdown(runs: Sequence[Run], runs_dir: Path) -> str:
    """Mean ± std over seeds of the best test accuracy up to the first learning-rate decay."""
    cells: Dict[tuple, List[float]] = {}
    for run in runs:
        c = run.config
        if not is_done(runs_dir / run.name):
            continue
        last = (c["lr_milestones"] or [c["epochs"]])[0]
        best = max(r["test_acc"] for r in read_rows(runs_dir / run.name) if r["epoch"] <= last)
        cells.setdefault((c["compressor"], c["method"], c["average_every"]), []).append(best)
    columns = [("ef", None)] + [("saef", p) for p in (None, 40, 20, 10, 5, 1)]
    head = "| top-k | EF | " + " | ".join(f"SAEF p={'∞' if p is None else p}" for _, p in columns[1:]) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for rho in sorted({k[0] for k in cells}, key=lambda s: float(s.split(":")[1])):
        row = [f"{100 * float(rho.split(':')[1]):g} %"]
        for method, p in columns:
            values = cells.get((rho, method, p))
            row.append(_mean_std(values) + ("" if len(values) > 1 else " (1 seed)") if values else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def figures(experiment: str, runs: Sequence[Run], runs_dir: Path, out: Path) -> List[Path]:
    """The experiment's figures, each an overlay of runs grouped over seeds (mean ± std)."""
    from ..app.plots import plot_runs

    done = [r for r in runs if is_done(runs_dir / r.name)]
    made = []

    def overlay(name, select):
        chosen = [runs_dir / r.name for r in done if select(r.config)]
        if chosen:
            made.append(plot_runs(chosen, out / name))

    if experiment == "fig1":
        overlay("fig1-sign-momentum.png", lambda c: c["workers"] == 4 and c["momentum"] == 0.9)
        overlay("fig1-sign-sgd.png", lambda c: c["workers"] == 4 and c["momentum"] == 0.0)
        overlay("fig1-topk.png", lambda c: c["workers"] == 8)
    elif experiment == "fig3":
        overlay("fig3-error-averaging.png", lambda c: True)
        made.append(_mismatch_figure(done, runs_dir, out / "fig3-mismatch.png"))
    elif experiment == "table1":
        overlay("table1-topk1.png", lambda c: c["compressor"] == "topk:0.01" and (c["method"] == "ef" or c["average_every"] in (None, 10, 1)))
    return made


def _mismatch_figure(runs: Sequence[Run], runs_dir: Path, path: Path) -> Path:
    """Figure 3 (right) analogue: both gradient-mismatch terms over training, and accuracy at x and x~."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..app.plots import run_label, save_figure

    fig = Figure(figsize=(12, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    groups: Dict[str, List[List[dict]]] = {}
    for run in runs:
        groups.setdefault(run_label(run.config), []).append(read_rows(runs_dir / run.name))
    for index, (label, seeds) in enumerate(sorted(groups.items())):
        color = f"C{index}"
        n = min(len(r) for r in seeds)
        epochs = np.arange(1, n + 1)
        for ax, key, style in ((axes[0], "mismatch_ef", "-"), (axes[1], "mismatch_saef", "-")):
            values = np.array([[r[key] for r in rows[:n]] for rows in seeds], dtype=float)
            ax.plot(epochs, values.mean(0), style, color=color, label=f"{label} ({len(seeds)} seeds)")
            if len(seeds) > 1:  # min-max over seeds: mean - std can fall below zero on a log axis
                ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.2)
        for key, style in (("test_acc", "-"), ("test_acc_aux", "--")):
            values = 100 * np.array([[r[key] for r in rows[:n]] for rows in seeds], dtype=float)
            axes[2].plot(epochs, values.mean(0), style, color=color, label=f"{label}, {'x' if key == 'test_acc' else 'x~'}")
    axes[0].set_title("bounds EF's mismatch: ||e_s + ē||²", fontsize=10)
    axes[1].set_title("bounds SAEF's mismatch: mean_k ||e_s + ē − e_k||²", fontsize=10)
    axes[2].set_title("test accuracy: x solid, x~ dashed", fontsize=10)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_ylabel("squared norm (epoch mean), log scale")
    axes[2].set_ylabel("test top-1 accuracy (%)")
    axes[2].set_ylim(bottom=max(0, axes[2].get_ylim()[0]))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=6)
    fig.suptitle("Gradient mismatch over training (epoch means; shaded: min-max over seeds)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=None)


def summary_markdown(runs: Sequence[Run], runs_dir: Path) -> str:
    """Per configuration, over seeds: final and best test accuracy at x, final at x~, final train loss,
    and the bits one worker sent and received."""
    from ..app.plots import run_label, traffic_bits

    groups: Dict[str, List[List[dict]]] = {}
    for run in runs:
        if is_done(runs_dir / run.name):
            c = run.config
            label = f"{run_label(c)}, mu={c['momentum']}"
            groups.setdefault(label, []).append(read_rows(runs_dir / run.name))
    lines = ["| run | seeds | final test acc. at x (%) | best (%) | final at x~ (%) | final train loss | MB per worker (up + down + averaging) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, seeds in sorted(groups.items()):
        final = [rows[-1]["test_acc"] for rows in seeds]
        best = [max(r["test_acc"] for r in rows) for rows in seeds]
        aux = [rows[-1]["test_acc_aux"] for rows in seeds if rows[-1]["test_acc_aux"] is not None]
        loss = np.array([rows[-1]["train_loss"] for rows in seeds])
        megabytes = traffic_bits(seeds[0][-1]) / 8e6
        lines.append(f"| {label} | {len(seeds)} | {_mean_std(final)} | {_mean_std(best)} | {_mean_std(aux) if aux else '–'} "
                     f"| {loss.mean():.4f} | {megabytes:.2f} |")
    return "\n".join(lines)


def _write_results(name: str, runs: Sequence[Run], runs_dir: Path, out: Path, setting: str) -> None:
    """The experiment's Markdown tables and figures, rebuilt from the run directories into ``out``."""
    from ..files import write_atomically

    suffix = "" if setting == "mnist1d" else f"-{setting}"
    text = f"# {name} ({setting})\n\n"
    if name in STUDIES:
        study = _study(name)
        body, made = study.report(runs, runs_dir, out, _finished_rows)
        path = out / f"{name}-tables{suffix}.md"
        text = f"# {getattr(study, 'TITLE', f'{name} ({setting})')}\n\n" + body
    else:
        if name == "table1":
            text += "Best test top-1 accuracy (%) up to the first learning-rate decay, mean ± std over seeds.\n\n"
            text += table1_markdown(runs, runs_dir) + "\n\n"
        text += summary_markdown(runs, runs_dir) + "\n"
        made, path = figures(name, runs, runs_dir, out), out / f"{name}{suffix}.md"
    write_atomically(path, text.encode())
    for figure in made:
        print(f"saef reproduce: wrote {figure}")
    print(f"saef reproduce: wrote {path}")


def _study(name: str):
    """The module of an experiment with its own report (:data:`STUDIES`), or None."""
    if name not in STUDIES:
        return None
    import importlib

    return importlib.import_module(f".{STUDIES[name]}", __package__)


def _finished_rows(run_dir: Path):
    """A finished run's metric rows; None for a run that has not finished."""
    return read_rows(run_dir) if is_done(run_dir) else None


def _reported(name: str, ran: List[Run], args, libsvm: Optional[str], runs_dir: Path) -> List[Run]:
    """The runs an experiment's report covers: those run now, or with ``--workers`` the whole study (both
    phases), so that a sitting at some K does not drop what another sitting ran."""
    if args.workers is None or name not in SWEEPS_WORKERS:
        return ran
    whole = plan(name, args.setting, args.seeds, libsvm)
    whole += _study(name).confirm(Run.make, whole, args.seeds or EXPERIMENTS[name][1], runs_dir, _finished_rows)
    return list({run.name: run for run in whole}.values())


def _libsvm_file(given: Optional[str]) -> Optional[str]:
    """The a9a file of the baselines study as an absolute path; None, after a one-line error on stderr, when
    it is not given or not a file (there is no default place to look for it)."""
    if given is None:
        print("saef reproduce: baselines needs the a9a LIBSVM file: --libsvm-file FILE", file=sys.stderr)
        return None
    if not Path(given).is_file():
        print(f"saef reproduce: --libsvm-file {given} is not a file", file=sys.stderr)
        return None
    return str(Path(given).resolve())


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="saef reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="mnist1d")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: 5 for table1, 3 for figures)")
    parser.add_argument("--runs", default="runs/reproduce", help="where the run directories go (default runs/reproduce)")
    parser.add_argument("--out", default="docs/results", help="where tables and figures go (default docs/results)")
    parser.add_argument("--data-dir", default=None, help="dataset folder (see saef train --data-dir)")
    parser.add_argument("--libsvm-file", default=None, help="baselines (required there): the a9a LIBSVM file "
                        "(https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html#a9a)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, metavar="K",
                        help=f"{', '.join(SWEEPS_WORKERS)}: only the runs at these numbers of workers (default: every K of the study)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.seeds is not None and args.seeds < 1):
        parser.error("--jobs and --seeds must be >= 1")
    if args.workers is not None and not set(args.experiments) <= set(SWEEPS_WORKERS):
        parser.error(f"--workers applies to {', '.join(SWEEPS_WORKERS)} only")
    runs_dir, out = Path(args.runs) / args.setting, Path(args.out)
    libsvm = _libsvm_file(args.libsvm_file) if "baselines" in args.experiments else None
    if "baselines" in args.experiments and libsvm is None:
        return 2
    try:
        plans = {name: plan(name, args.setting, args.seeds, libsvm, args.workers) for name in args.experiments}
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        for name, runs in plans.items():
            for run in runs:
                print(f"{name}: {run.name}{' (done)' if is_done(runs_dir / run.name) else ''}")
        return 0
    start = time.monotonic()
    ok = run_all([r for runs in plans.values() for r in runs], runs_dir, args.jobs, args.data_dir)
    for name in [n for n in plans if hasattr(_study(n), "confirm")]:  # a second phase: the other seeds at each chosen lr
        more = _study(name).confirm(Run.make, plans[name], args.seeds or EXPERIMENTS[name][1], runs_dir, _finished_rows)
        ok.update(run_all(more, runs_dir, args.jobs, args.data_dir))
        plans[name] = plans[name] + more
    out.mkdir(parents=True, exist_ok=True)
    for name, runs in plans.items():  # (the report covers every K of the study: runs of other sittings are in it)
        _write_results(name, _reported(name, runs, args, libsvm, runs_dir), runs_dir, out, args.setting)
    failed = [r.name for r, good in ok.items() if not good]
    print(f"saef reproduce: {len(ok) - len(failed)}/{len(ok)} runs finished in {(time.monotonic() - start) / 60:.1f} min")
    if failed:
        print(f"saef reproduce: {len(failed)} run(s) failed; their logs are next to their directories in {runs_dir}", file=sys.stderr)
        return 1
    return 0
