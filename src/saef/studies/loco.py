"""``saef reproduce loco``: communicating rarely on the byte-level GPT -- DiLoCo, SparseLoCo-style error
feedback and SAEF-LoCo beside per-step training, at equal tokens.

The default GPT (2 layers, width 128, context 64) on the default corpus (2 MB of the standard library's
``.py`` files), global batch 64, 3 epochs with the lr divided by 10 after the second, the same tokens for
every method (every run one ``saef train``, see :mod:`saef.studies.reproduce`); K = 4 and 8 workers:

* DDP-AdamW: AdamW on the mean gradient of the global batch every step, dense fp32 both ways (one worker
  taking the global batch is that, exactly; its traffic per step is what each of K workers sends and
  receives);
* DiLoCo: H = 16 and 64 inner AdamW steps, outer Nesterov (lr 0.7, momentum 0.9), pseudo-gradients in fp32,
  or in bf16 both ways;
* SparseLoCo-style: H = 16, EF with the error decayed by 0.95, top-k 2 % per chunk of 4096 with 2-bit values,
  outer SGD (lr 1), the server's reply compressed the same way (saef's sharded server: a compressed reply with
  a server error, not SparseLoCo's all-gather of every worker's payload);
* SAEF-LoCo: the same with the step-ahead start, p = never and p = 4 rounds;
* per-step 1-bit Adam (EF-Adam, sign) and SAEF-Adam, for reference (the settings of ``saef reproduce adam``).

The learning rates are chosen on a split held out of training (``--holdout 2000``), never on the
validation (test) split: every AdamW method runs the grid :data:`LRS` with seed 0, and the lr with the lowest
final held-out loss is run with the other seeds (:func:`confirm`). The report gives the final validation bits
per byte at x (and x~) against megabytes per worker, and curves against bytes and against rounds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..app.plots import mean_std, save_figure, traffic_bits

__all__ = ["plan", "confirm", "report", "METHODS", "TITLE"]

TITLE = "loco: local steps with compressed pseudo-gradients on the byte-level GPT"

BASE = dict(dataset="text", model="gpt", batch_size=64, epochs=3, lr_milestones=[2], lr_decay=0.1, holdout=2000, device="cpu")
LRS = (3e-4, 1e-3, 3e-3)  # the inner AdamW's lr grid (seed 0; the best held-out loss is kept)
WORKERS = (4, 8)
ADAMW = dict(inner_optimizer="adamw", momentum=0.0)
DILOCO = dict(**ADAMW, method="direct", outer_lr=0.7, outer_momentum=0.9, nesterov=True)
SPARSE = dict(**ADAMW, compressor="topk:0.02:chunk=4096:int2", error_decay=0.95, outer_lr=1.0, double_way=True, local_steps=16)
ONE_BIT = dict(optimizer="adam", lr=3e-4, eps=1e-8, warmup_steps=200, compressor="sign", double_way=True)
METHODS: List[Tuple[str, Dict[str, object], bool]] = [  # (label, settings, whether the lr is tuned)
    ("DDP-AdamW (fp32, every step)", dict(**ADAMW, method="direct", compressor="identity", double_way=False, local_steps=1,
                                          workers=1), True),
    ("DiLoCo H=16 (fp32)", dict(**DILOCO, compressor="identity", double_way=False, local_steps=16), True),
    ("DiLoCo H=16 (bf16)", dict(**DILOCO, compressor="identity:bf16", double_way=True, local_steps=16), True),
    ("DiLoCo H=64 (fp32)", dict(**DILOCO, compressor="identity", double_way=False, local_steps=64), True),
    ("DiLoCo H=64 (bf16)", dict(**DILOCO, compressor="identity:bf16", double_way=True, local_steps=64), True),
    ("SparseLoCo-style EF (H=16, top-k 2 %/4096, int2)", dict(**SPARSE, method="ef"), True),
    ("SAEF-LoCo (H=16, top-k 2 %/4096, int2), p = never", dict(**SPARSE, method="saef"), True),
    ("SAEF-LoCo (H=16, top-k 2 %/4096, int2), p = 4", dict(**SPARSE, method="saef", average_every=4), True),
    ("1-bit Adam (EF-Adam, sign, every step)", dict(**ONE_BIT, method="ef"), False),
    ("SAEF-Adam (sign, every step)", dict(**ONE_BIT, method="saef"), False),
]


def _runs_of(make_run, label_settings, workers: int, seed: int, lrs) -> list:
    settings = {**BASE, "workers": workers, **label_settings, "seed": seed}
    return [make_run(**{**settings, "lr": lr}) for lr in lrs]


def plan(make_run, seeds: int, workers_asked: Optional[Sequence[int]] = None) -> list:
    """The first phase: every method at every K of ``workers_asked`` (default :data:`WORKERS`), its lr grid
    with seed 0 (an untuned method: every seed at its lr). ``seeds`` is for :func:`confirm` too."""
    sweep = tuple(sorted(set(workers_asked))) if workers_asked else WORKERS
    if not set(sweep) <= set(WORKERS):
        raise ValueError(f"the loco study runs K = {', '.join(map(str, WORKERS))}; asked for {', '.join(map(str, sweep))}")
    runs = []
    for workers in sweep:
        for _, settings, tuned in METHODS:
            if settings.get("workers") == 1 and workers != sweep[0]:
                continue  # (DDP-AdamW does not depend on K: one run stands for every K)
            if tuned:
                runs += _runs_of(make_run, settings, workers, 0, LRS)
            else:
                runs += [r for seed in range(seeds) for r in _runs_of(make_run, settings, workers, seed, (settings["lr"],))]
    return runs


def confirm(make_run, first: Sequence, seeds: int, runs_dir: Path, read_rows) -> list:
    """The second phase: seeds 1 .. seeds - 1 of every tuned method at the lr its seed 0 chose."""
    runs = []
    for entry in select(first, runs_dir, read_rows).values():
        if entry["tuned"]:
            runs += [make_run(**{**entry["config"], "seed": seed}) for seed in range(1, seeds)]
    return runs


# --- reading the runs ---------------------------------------------------------------------------------
def _method_of(config: Dict[str, object]) -> Optional[Tuple[str, bool]]:
    for label, settings, tuned in METHODS:
        wanted = {"average_every": None, "local_steps": None, **{k: v for k, v in settings.items() if k != "lr" or not tuned}}
        if all(config.get(k) == v for k, v in wanted.items()):
            return label, tuned
    return None


def _held_out(rows: Optional[List[dict]]) -> float:
    """The final held-out loss (lower is better); a run that did not finish (diverged) scores worst."""
    value = rows[-1].get("val_loss") if rows else None
    return math.inf if value is None or not math.isfinite(value) else value


def select(runs: Sequence, runs_dir: Path, read_rows) -> Dict[Tuple[str, int], dict]:
    """Per (method, K): the lr whose seed 0 had the lowest final held-out loss, the finished runs at that lr
    (every seed), how many failed, and every lr's seed-0 score."""
    by_method: Dict[Tuple[str, int], Dict[float, list]] = {}
    tuned_of = {}
    for run in runs:
        found = _method_of(run.config)
        if found is None:
            continue
        label, tuned = found
        key = (label, run.config["workers"])
        tuned_of[key] = tuned
        by_method.setdefault(key, {}).setdefault(run.config["lr"], []).append((run.config, read_rows(runs_dir / run.name)))
    chosen = {}
    for key, by_lr in by_method.items():
        scores = {lr: _held_out(next((rows for config, rows in seeds if config["seed"] == 0), None)) for lr, seeds in by_lr.items()}
        best = min(scores, key=lambda lr: (scores[lr], lr))
        finished = [rows for _, rows in by_lr[best] if rows]
        chosen[key] = {"lr": best, "scores": scores, "config": by_lr[best][0][0], "seeds": finished,
                       "failed": len(by_lr[best]) - len(finished), "tuned": tuned_of[key]}
    return chosen


def _pm(values: Sequence[Optional[float]]) -> str:
    present = [v for v in values if v is not None]
    return mean_std(present, digits=3) if present else "–"


def markdown(chosen: Dict[Tuple[str, int], dict]) -> str:
    lines = ["| method | K | lr (held-out grid) | seeds | final val. bits/byte at x | at x~ | rounds | MB per worker | "
             "vs DDP-AdamW bytes |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    ddp = next((e for (label, _), e in chosen.items() if label.startswith("DDP") and e["seeds"]), None)
    ddp_mb = traffic_bits(ddp["seeds"][0][-1]) / 8e6 if ddp else None
    for (label, workers), entry in sorted(chosen.items(), key=lambda kv: (kv[0][1], [m[0] for m in METHODS].index(kv[0][0]))):
        seeds = entry["seeds"]
        chose = math.isfinite(entry["scores"][entry["lr"]])  # (no star where no lr has finished yet)
        grid = (", ".join(f"{lr:g}{'*' if chose and lr == entry['lr'] else ''}" for lr in sorted(entry["scores"]))
                if entry["tuned"] else f"{entry['lr']:g}")
        if not seeds:
            lines.append(f"| {label} | {workers} | {grid} | 0 (not run yet) | – | – | – | – | – |")
            continue
        last = seeds[0][-1]
        megabytes = traffic_bits(last) / 8e6
        ratio = "(the reference)" if label.startswith("DDP") else f"{ddp_mb / megabytes:,.0f}x fewer" if ddp_mb and megabytes else "–"
        lines.append(f"| {label} | {'any' if label.startswith('DDP') else workers} | {grid} | {len(seeds)}"
                     + (f" ({entry['failed']} failed)" if entry["failed"] else "")
                     + f" | {_pm([rows[-1]['test_bpb'] for rows in seeds])} | {_pm([rows[-1]['test_bpb_aux'] for rows in seeds])} "
                     f"| {last.get('rounds', '–')} | {megabytes:,.2f} | {ratio} |")
    return "\n".join(lines)


def figure(chosen: Dict[Tuple[str, int], dict], workers: int, path: Path) -> Path:
    """Validation bits per byte at x against megabytes per worker and against rounds, at K = ``workers``
    (mean over seeds; shaded: min to max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = [(label, e) for (label, k), e in chosen.items() if e["seeds"] and (k == workers or label.startswith("DDP"))]
    for i, (label, entry) in enumerate(drawn):
        seeds = entry["seeds"]
        n = min(len(rows) for rows in seeds)
        bpb = np.array([[r["test_bpb"] for r in rows[:n]] for rows in seeds], dtype=float)
        megabytes = np.array([traffic_bits(r) / 8e6 for r in seeds[0][:n]])
        rounds = np.array([r.get("rounds") or r["step"] for r in seeds[0][:n]], dtype=float)
        for ax, x in ((axes[0], megabytes), (axes[1], rounds)):
            ax.plot(x, bpb.mean(0), "o-", color=colors[i % len(colors)], label=f"{label} ({len(seeds)} seeds)")
            if len(seeds) > 1:
                ax.fill_between(x, bpb.min(0), bpb.max(0), color=colors[i % len(colors)], alpha=0.2)
    axes[0].set_xlabel("MB sent and received per worker (log scale)")
    axes[1].set_xlabel("rounds: exchanges between the workers (log scale)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("validation bits per byte at x")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Byte-level GPT on the stdlib corpus, K = {workers}: communicating rarely", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=None)


def report(runs: Sequence, runs_dir: Path, out: Path, read_rows) -> Tuple[str, List[Path]]:
    """The table (Markdown) and the figures of the finished runs."""
    chosen = select(runs, runs_dir, read_rows)
    if not any(e["seeds"] for e in chosen.values()):
        return "No finished runs yet.\n", []
    text = ("Validation (the corpus's last 10 %) loss in bits per byte after the last epoch, mean ± std over seeds, "
            "at the lr chosen on 2000 training samples held out of training (* in the grid).\n\n" + markdown(chosen) + "\n")
    made = [figure(chosen, k, out / f"loco-K{k}.png") for k in WORKERS if any(key[1] == k and e["seeds"] for key, e in chosen.items())]
    return text, made
