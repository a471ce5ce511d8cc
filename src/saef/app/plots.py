"""Pictures of training runs: one run's curves, and several runs overlaid with mean +- std over seeds.

A run directory holds ``config.json`` (the resolved config) and ``metrics.jsonl`` (one JSON object per epoch).
This module reads only those two files and imports nothing from training, so it works on runs copied off a
cluster and on a run that is still writing.

Example::

    from saef.app.plots import plot_run, plot_runs
    plot_run("runs/saef_sign")                  # -> runs/saef_sign/curves.png
    plot_runs(["runs/ef_s0", "runs/ef_s1", "runs/saef_s0", "runs/saef_s1"], "compare.png")

Figures are drawn on matplotlib's non-interactive Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never
through pyplot: no global backend is switched, so importing this module leaves a notebook's backend alone, and
no figure stays registered in pyplot (nothing to close, nothing leaks in long sweeps). PNGs are written
atomically: a reader (or a crash) never sees a half-written file.

Communicated bits are ``bits_up + bits_down + bits_averaging`` per worker: error averaging crosses the network
too, and leaving it out would flatter SAEF against EF. The axis label says when averaging bits are included.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..files import write_atomically
from .records import read_metrics, read_step_metrics

__all__ = ["run_label", "read_run", "RunGroup", "group_runs", "run_figure", "runs_figure", "plot_run", "plot_runs"]

PathLike = Union[str, os.PathLike]
Row = Dict[str, object]

FIGSIZE = (11.0, 8.0)
DPI = 120
# Markers help read a short run epoch by epoch but clutter a long one.
MAX_POINTS_WITH_MARKERS = 25
# Config keys that change results: runs grouped under one label should agree on all of them (seed aside).
_GROUP_KEYS = ("method", "compressor", "server_compressor", "workers", "double_way", "average_every", "momentum",
               "weight_decay", "lr", "dataset", "model", "epochs", "batch_size")


def run_label(config: Dict[str, object]) -> str:
    """A short label for a run, e.g. ``"SAEF topk:0.01 DC K=4"``, ``"EF sign SC K=4 p=10"``.

    DC = double-way compression (the server compresses too), SC = single-way; ``p`` (error-averaging period)
    appears only when ``average_every`` is set. Full-precision SGD reads ``"SGD (full precision) K=4"``:
    without compression, one-/two-way and averaging mean nothing. With optimizer adam the method reads
    ``"SAEF-Adam"`` (``"EF-Adam"`` is 1-bit Adam), the baseline ``"Adam (full precision)"``. Missing keys are left out of the label.
    """
    method = str(config.get("method", "?")).upper()
    compressor = config.get("compressor")
    workers = config.get("workers")
    k_part = [f"K={workers}"] if workers is not None else []
    adam = config.get("optimizer") == "adam"  # (the local optimizer: SAEF-Adam, EF-Adam = 1-bit Adam)
    if method == "SGD" and compressor in (None, "identity"):
        return " ".join(["Adam (full precision)" if adam else "SGD (full precision)"] + k_part)
    method += "-Adam" if adam else ""
    parts = [method]
    if compressor is not None:
        parts.append(str(compressor))
    if config.get("double_way") is not None:
        parts.append("DC" if config["double_way"] else "SC")
    parts += k_part
    if config.get("average_every") is not None:
        parts.append(f"p={config['average_every']}")
    return " ".join(parts)


def read_run(run_dir: PathLike) -> Tuple[Dict[str, object], List[Row]]:
    """Read ``config.json`` and ``metrics.jsonl`` of a run directory; returns ``(config, rows)``.

    Rows come back sorted by step: one per epoch (a resumed run may write an epoch twice, and the later line
    wins), and with ``--eval-every`` the rows of ``steps.jsonl`` between them (fractional epochs). An
    unterminated last line that does not parse is a write in progress (or cut by a crash) and is
    skipped with a warning; any other malformed line raises ``ValueError`` naming the file and line.
    Raises ``FileNotFoundError`` naming the missing file.
    """
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")

    rows = read_metrics(run_dir)
    return config, sorted(rows + read_step_metrics(run_dir), key=lambda row: row["epoch"])  # (epochs done: in step order)


@dataclass
class RunGroup:
    """Runs shown as one curve: same label, typically the same config with different seeds."""

    label: str  # the legend text, with "(n seeds)" when the group holds several runs
    run_dirs: List[Path] = field(default_factory=list)
    configs: List[Dict[str, object]] = field(default_factory=list)
    rows: List[List[Row]] = field(default_factory=list)  # one list of epoch rows per run


def group_runs(run_dirs: Sequence[PathLike], labels: Optional[Sequence[str]] = None) -> List[RunGroup]:
    """Read runs and group those with the same label (``run_label`` of the config, or the given ``labels``).

    Groups keep the order in which their first run appears. Warns if runs of one group differ in a key that
    changes results (lr, momentum, ...) or repeat a seed, since their mean +- std would then mislead.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"labels must give one label per run: {len(labels)} labels for {len(run_dirs)} runs")
    groups: Dict[str, RunGroup] = {}
    for i, run_dir in enumerate(run_dirs):
        config, rows = read_run(run_dir)
        base = labels[i] if labels is not None else run_label(config)
        group = groups.setdefault(base, RunGroup(label=base))
        group.run_dirs.append(run_dir)
        group.configs.append(config)
        group.rows.append(rows)
    for base, group in groups.items():
        if len(group.configs) > 1:
            group.label = f"{base} ({len(group.configs)} seeds)"
            differing = [k for k in _GROUP_KEYS if len({json.dumps(c.get(k)) for c in group.configs}) > 1]
            if differing:
                warnings.warn(f"runs grouped as {base!r} differ in {differing}; pass labels= to separate them",
                              stacklevel=2)
            seeds = [c.get("seed") for c in group.configs]
            if len(set(map(json.dumps, seeds))) < len(seeds):
                warnings.warn(f"runs grouped as {base!r} repeat a seed ({seeds}); is a run listed twice?",
                              stacklevel=2)
    return list(groups.values())


def _finite(value: object) -> Optional[float]:
    """The value as a float, or None if null or not finite (a diverged loss is left out, not drawn as a spike)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def traffic_bits(row: Row) -> Optional[float]:
    """Bits one worker sent and received so far, error averaging included; None if not recorded."""
    up, down = _finite(row.get("bits_up")), _finite(row.get("bits_down"))
    if up is None or down is None:
        return None
    return up + down + (_finite(row.get("bits_averaging")) or 0.0)


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of ``scale * values`` (std with ddof 1; 0 for one value), as the study tables print it."""
    a = scale * np.asarray(values, dtype=float)
    spread = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.{digits}f} ± {spread:.{digits}f}"


def _series(runs: Sequence[Sequence[Row]], key: str, x: str = "epoch", scale: float = 1.0):
    """Mean and std (ddof=1; 0 for one run) of ``key`` over runs, against epoch, rounds (exchanges) or
    communicated bits.

    Only epochs at which every run has a finite value are used, so the mean is always over the same runs
    (a mean over a changing subset would jump where a seed stops). Returns (x, mean, std), possibly empty.
    """
    per_run = []
    for rows in runs:
        points = {}
        for row in rows:
            xv = float(row["epoch"]) if x == "epoch" else _finite(row.get("rounds")) if x == "rounds" else traffic_bits(row)
            yv = _finite(row.get(key))
            if xv is not None and yv is not None:
                points[row["epoch"]] = (xv, yv * scale)
        per_run.append(points)
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.array([[p[e] for e in common] for p in per_run], dtype=float).reshape(len(per_run), len(common), 2)
    xs, ys = values[..., 0], values[..., 1]
    std = ys.std(axis=0, ddof=1) if len(per_run) > 1 else np.zeros(len(common))
    return xs.mean(axis=0), ys.mean(axis=0), std


_TIME_LABELS = {"epoch": "epoch", "rounds": "rounds (exchanges between the workers)"}


def _draw(ax, x, mean, std, color, label, linestyle="-", log_x=False, log_y=False) -> bool:
    """Draw one curve with its std band; points a log axis cannot show (<= 0) are dropped. True if drawn."""
    keep = np.ones(len(x), dtype=bool)
    if log_x:
        keep &= x > 0
    if log_y:
        keep &= mean > 0
    x, mean, std = x[keep], mean[keep], std[keep]
    if len(x) == 0:
        return False
    marker = "o" if len(x) <= MAX_POINTS_WITH_MARKERS else None
    ax.plot(x, mean, color=color, linestyle=linestyle, marker=marker, markersize=3, label=label)
    if np.any(std > 0):
        low = mean - std
        if log_y:  # a band reaching below zero cannot be drawn on a log axis; clip it to the curve's scale
            low = np.maximum(low, mean * 1e-3)
        ax.fill_between(x, low, mean + std, color=color, alpha=0.2, linewidth=0)
    return True


def _power_of_ten_label(value: float, _position=None) -> str:
    """``2e8`` as $2\\times10^{8}$ and ``1e8`` as $10^{8}$, like matplotlib's own decade labels."""
    if value <= 0:
        return ""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = round(value / 10**exponent)
    return f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa}\\times10^{{{exponent}}}$"


def _log_x(ax) -> None:
    """Log x axis whose labels never collide: minor ticks unlabelled; 1-2-5 labels when under two decades."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    low, high = ax.dataLim.intervalx
    if 0 < low < high and math.log10(high / low) < 2:  # too few powers of ten to read the scale from
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_power_of_ten_label))


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
    # Ticks of an empty panel are matplotlib's placeholder range; they would read as data.
    ax.tick_params(which="both", left=False, bottom=False, labelleft=False, labelbottom=False)


def _bits_label(runs: Sequence[Sequence[Row]]) -> str:
    averaged = any((_finite(r.get("bits_averaging")) or 0) > 0 for rows in runs for r in rows)
    return "bits sent + received per worker" + (" (incl. error averaging)" if averaged else "") + ", log scale"


def _new_figure() -> Tuple[Figure, np.ndarray]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself to fig: the non-interactive Agg canvas, no pyplot involved
    axes = fig.subplots(2, 2)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _config_line(config: Dict[str, object], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in keys if config.get(k) is not None)


def run_figure(run_dir: PathLike) -> Figure:
    """One run's curves as a 2x2 figure: loss, test accuracy at x and x~, accuracy vs bits, mismatch terms."""
    config, rows = read_run(run_dir)
    runs = [rows]
    fig, ((loss_ax, acc_ax), (bits_ax, mismatch_ax)) = _new_figure()
    c_x, c_aux, c_test = "tab:blue", "tab:orange", "tab:green"

    drawn = _draw(loss_ax, *_series(runs, "train_loss"), c_x, "train loss")
    drawn |= _draw(loss_ax, *_series(runs, "test_loss"), c_test, "test loss at x", linestyle=":")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")

    for ax, x, log_x in ((acc_ax, "epoch", False), (bits_ax, "bits", True)):
        acc = _draw(ax, *_series(runs, "test_acc", x, 100), c_x, "at x (model)", log_x=log_x)
        acc |= _draw(ax, *_series(runs, "test_acc_aux", x, 100), c_aux, r"at $\tilde{x}$ (auxiliary)", "--", log_x=log_x)
        ax.set_ylabel("test accuracy (%)")
        if not acc:
            _no_data(ax, "no test accuracy recorded")
        else:
            ax.legend(loc="lower right")
    acc_ax.set(title="Test accuracy", xlabel="epoch")
    bits_ax.set(title="Test accuracy vs communication", xlabel=_bits_label(runs))
    _log_x(bits_ax)

    mismatch = _draw(mismatch_ax, *_series(runs, "mismatch_ef"), "tab:red",
                     r"EF bound: $\|e_s + \bar e\|^2$", log_y=True)
    mismatch |= _draw(mismatch_ax, *_series(runs, "mismatch_saef"), "tab:purple",
                      r"SAEF bound: mean$_k \|e_s + \bar e - e_k\|^2$", "--", log_y=True)
    mismatch_ax.set(title="Gradient mismatch (epoch mean)", xlabel="epoch", ylabel="squared norm, log scale")
    mismatch_ax.set_yscale("log")
    if mismatch:
        mismatch_ax.legend(loc="best")
    else:  # null for sgd; exactly 0 without compression, which a log axis cannot show
        _no_data(mismatch_ax, "no positive mismatch recorded\n(none or zero: no compression error)")
    if drawn:
        loss_ax.legend(loc="upper right")
    else:
        _no_data(loss_ax, "no loss recorded yet")

    details = _config_line(config, ("dataset", "model", "lr", "momentum", "batch_size", "seed"))
    fig.suptitle(f"{run_label(config)}\n{details}", fontsize=11)
    fig.tight_layout()
    return fig


def runs_figure(run_dirs: Sequence[PathLike], labels: Optional[Sequence[str]] = None) -> Figure:
    """Several runs overlaid as a 2x2 figure (loss and accuracy, vs epoch and vs bits); one curve per group.
    When a run takes local steps, the upper panels are against rounds (exchanges) instead of epochs.

    Runs with the same label (see :func:`group_runs`) are drawn as their mean with a mean +- std band.
    The legend sits below the panels, so it never covers a curve; its texts are the groups' labels.
    """
    groups = group_runs(run_dirs, labels)
    fig, axes = _new_figure()
    time = "rounds" if any(c.get("local_steps") for g in groups for c in g.configs) else "epoch"
    panels = (  # (metric, x, scale, title, y label)
        ("train_loss", time, 1, "Train loss", "train loss (cross-entropy)"),
        ("test_acc", time, 100, "Test accuracy", "test accuracy (%)"),
        ("train_loss", "bits", 1, "Train loss vs communication", "train loss (cross-entropy)"),
        ("test_acc", "bits", 100, "Test accuracy vs communication", "test accuracy (%)"),
    )
    all_runs = [rows for g in groups for rows in g.rows]
    colors = [f"C{i % 10}" for i in range(len(groups))]
    # Past ten groups the colors repeat, so the line style changes with each cycle.
    styles = ["-", "--", ":", "-."]
    for ax, (key, x, scale, title, ylabel) in zip(axes.flat, panels):
        drawn = False
        for i, group in enumerate(groups):
            style = styles[(i // 10) % len(styles)]
            drawn |= _draw(ax, *_series(group.rows, key, x, scale), colors[i], group.label, style, log_x=x == "bits")
        ax.set(title=title, ylabel=ylabel, xlabel=_TIME_LABELS.get(x) or _bits_label(all_runs))
        if x == "bits":
            _log_x(ax)
        if not drawn:
            _no_data(ax, "no data recorded")

    # One legend for the figure: entries are the groups, taken from the first panel that drew each of them.
    handles = {}
    for ax in axes.flat:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    ncol = min(3, max(1, len(handles)))
    legend_rows = math.ceil(len(handles) / ncol)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=ncol, frameon=False)
    datasets = sorted({f"{c.get('dataset')} / {c.get('model')}" for g in groups for c in g.configs})
    fig.suptitle(datasets[0] if len(datasets) == 1 else "runs compared", fontsize=12)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.01, 1, 1))
    return fig


def save_figure(fig: Figure, out_png: PathLike, dpi: Optional[float] = DPI) -> Path:
    """Save ``fig`` as PNG at ``out_png``, whole or not at all (``dpi=None``: the figure's own)."""
    return write_atomically(out_png, lambda handle: fig.savefig(handle, format="png", dpi=dpi or fig.dpi), make_parent=True)


def plot_run(run_dir: PathLike, out_png: Optional[PathLike] = None) -> Path:
    """Draw one run's curves (see :func:`run_figure`) to ``out_png`` (default ``run_dir/curves.png``)."""
    out = Path(out_png) if out_png is not None else Path(run_dir) / "curves.png"
    return save_figure(run_figure(run_dir), out)


def plot_runs(run_dirs: Sequence[PathLike], out_png: PathLike, labels: Optional[Sequence[str]] = None) -> Path:
    """Overlay several runs (see :func:`runs_figure`) and write the PNG to ``out_png``; returns its path."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    return save_figure(runs_figure(run_dirs, labels), out_png)
