"""``saef reproduce adam``: compressed-momentum Adam on the byte-level GPT, against full-precision Adam.

The default GPT (2 layers, width 128, context 64) on the default corpus (2 MB of the standard library's
``.py`` files), K = 4, global batch 64, the same steps, warm-up and lr schedule for every method, several
seeds each (every run one ``saef train``, see :mod:`saef.studies.reproduce`):

* Adam in full precision (the dense mean, as an all-reduce moves it; v updated every step);
* EF-Adam: the EF rule with Adam, scaled sign, double-way (v frozen after the warm-up): 1-bit Adam's
  scheme with the paper's scaled sign ||v||_1/d where 1-bit Adam uses ||v||_2/sqrt(d);
* SAEF-Adam: the SAEF rule with Adam, scaled sign, double-way, p = never and p = 10;
* SAEF with momentum SGD, scaled sign, double-way, for reference (at its own lr).

The report gives the validation loss in bits per byte at x and at x~ per method (mean and spread over
seeds), the traffic per worker, and curves against steps and against bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..app.plots import mean_std, run_label, save_figure, traffic_bits

__all__ = ["plan", "report", "METHODS", "TITLE"]

TITLE = "adam: compressed-momentum Adam on the byte-level GPT"

# The schedule every method shares: 3 epochs of 432 steps (27,692 windows / 64), the lr divided by 10
# after the second, and the first 200 steps (~15 %) in full precision, as 1-bit Adam warms up.
SCHEDULE = dict(dataset="text", model="gpt", workers=4, batch_size=64, epochs=3, lr_milestones=[2], lr_decay=0.1,
                warmup_steps=200, double_way=True, device="cpu")
# The lrs: one-epoch runs of full-precision Adam at 1e-4, 3e-4, 1e-3, 3e-3, 1e-2 gave 3.28, 2.94, 3.67, 3.96,
# 4.35 bits per byte (validation); of SAEF with momentum SGD at 0.1, 0.3, 1.0: 3.96, diverged, diverged.
ADAM = dict(optimizer="adam", lr=3e-4, eps=1e-8)
SGDM = dict(optimizer="sgd", lr=0.1, momentum=0.9)
METHODS = [  # (label, settings)
    ("Adam, full precision", dict(**ADAM, method="sgd", compressor="identity", double_way=False)),
    ("EF-Adam (1-bit Adam's scheme, sign)", dict(**ADAM, method="ef", compressor="sign")),
    ("SAEF-Adam (sign)", dict(**ADAM, method="saef", compressor="sign")),
    ("SAEF-Adam (sign), p = 10", dict(**ADAM, method="saef", compressor="sign", average_every=10)),
    ("SAEF, momentum SGD (sign)", dict(**SGDM, method="saef", compressor="sign")),
]


def plan(make_run, seeds: int) -> list:
    """Every method of :data:`METHODS` with ``seeds`` seeds: ``make_run(**settings)`` each."""
    return [make_run(**{**SCHEDULE, **settings, "seed": seed}) for _, settings in METHODS for seed in range(seeds)]


def _label_of(config: Dict[str, object]) -> str:
    for label, settings in METHODS:
        wanted = {"average_every": None, **settings}  # (p = never unless the method says otherwise)
        if all(config.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in wanted.items()):
            return label
    return run_label(config)


def _groups(runs: Sequence, runs_dir: Path, read_rows) -> Dict[str, List[List[dict]]]:
    groups: Dict[str, List[List[dict]]] = {label: [] for label, _ in METHODS}
    for run in runs:
        rows = read_rows(runs_dir / run.name)
        if rows:
            groups.setdefault(_label_of(run.config), []).append(rows)
    return {label: seeds for label, seeds in groups.items() if seeds}


def _pm(values: Sequence[float]) -> str:
    """mean ± std to 3 decimals of the values that were recorded, or "–" where none were."""
    present = [v for v in values if v is not None]
    return mean_std(present, digits=3) if present else "–"


def markdown(groups: Dict[str, List[List[dict]]]) -> str:
    lines = ["| method | seeds | final val. bits/byte at x | at x~ | best at x | final train loss (nats) | MB per worker (up + down + averaging) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, seeds in groups.items():
        lines.append(f"| {label} | {len(seeds)} | {_pm([rows[-1]['test_bpb'] for rows in seeds])} "
                     f"| {_pm([rows[-1]['test_bpb_aux'] for rows in seeds])} "
                     f"| {_pm([min(r['test_bpb'] for r in rows) for rows in seeds])} "
                     f"| {_pm([rows[-1]['train_loss'] for rows in seeds])} | {traffic_bits(seeds[0][-1]) / 8e6:.1f} |")
    return "\n".join(lines)


def figure(groups: Dict[str, List[List[dict]]], path: Path) -> Path:
    """Validation bits per byte at x against steps and against megabytes per worker (mean over seeds;
    shaded: min to max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (label, seeds), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        n = min(len(rows) for rows in seeds)
        bpb = np.array([[r["test_bpb"] for r in rows[:n]] for rows in seeds], dtype=float)
        steps = np.array([r["step"] for r in seeds[0][:n]])
        megabytes = np.array([traffic_bits(r) / 8e6 for r in seeds[0][:n]])
        for ax, x in ((axes[0], steps), (axes[1], megabytes)):
            ax.plot(x, bpb.mean(0), "o-", color=color, label=f"{label} ({len(seeds)} seeds)")
            if len(seeds) > 1:
                ax.fill_between(x, bpb.min(0), bpb.max(0), color=color, alpha=0.2)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("MB sent and received per worker (log scale)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation bits per byte at x")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Byte-level GPT on the stdlib corpus, K = 4: compressed-momentum Adam", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=None)


def report(runs: Sequence, runs_dir: Path, out: Path, read_rows) -> Tuple[str, List[Path]]:
    """The table (Markdown) and the figure of the finished runs."""
    groups = _groups(runs, runs_dir, read_rows)
    if not groups:
        return "No finished runs yet.\n", []
    text = ("Validation (the corpus's last 10 %) loss in bits per byte after the last epoch, mean ± std over "
            "seeds.\n\n" + markdown(groups) + "\n")
    return text, [figure(groups, out / "adam-curves.png")]
