"""The tables, the figure and the design note of benchmarks/cost_model.py (markdown lines, a PNG)."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

import cost_model as cm

K_SWEEP = (8, 16, 32, 64, 128, 256, 512, 1024)
TABLE_K = (8, 64, 1024)
TABLE_GBIT = (1, 10, 100)
BASELINES = ("ddp-fp32", "ddp-bf16", "ddp-powersgd")
SAEF = ("saef-sign", "saef-topk", "saef-topk-fp16")
# communicating rarely, on the transformer: per-step AdamW baselines and saef's 1-bit Adam beside the DiLoCo family
LOCO = ("ddp-adamw-fp32", "ddp-bf16", "ddp-adamw-powersgd", "saef-1bit-adam", "diloco-h16", "diloco-h64", "diloco-h64-bf16", "saef-loco")
LOCO_GBIT = (0.01, 0.1, 1, 10)


def gbit(bps: float) -> str:
    return f"{bps / 1e9:.3g}"


def inputs_table(inputs: dict) -> List[str]:
    """The measured compute of each variant without a network (local batch 64 | 32)."""
    lines = [f"Inputs measured {inputs['date']} on {inputs['machine']} ({inputs['cores']} cores, torch "
             f"{inputs['torch']}, {inputs['kernels']} saef kernels, one thread per process, {inputs['seconds']} s):", "",
             "| model | variant | step without network, batch 64 / 32 (s) |", "|---|---|---:|"]
    for model, steps in inputs["steps"].items():
        for variant, by_batch in steps.items():
            lines.append(f"| {model} | {variant} | {by_batch.get('64', float('nan')):.3f} / {by_batch.get('32', float('nan')):.3f} |")
    lines += ["", "| K | gloo all_reduce (tiny) | all_to_all (tiny) | broadcast (tiny) | K processes computing at once: slowdown "
              "of the plain step (mlp5m, resnet20, gpt), against the model's max(1, K / cores) |", "|---:|---:|---:|---:|---|"]
    for k, per in inputs["collectives"].items():
        steps, together = inputs["steps"], inputs.get("sharing", {}).get(k, {})
        slow = ", ".join(f"{together[m] / steps[m]['none'][str(cm.GLOBAL_BATCH // int(k))]:.2f}" for m in together)
        lines.append(f"| {k} | {1e3 * per['all_reduce']:.2f} ms | {1e3 * per['all_to_all']:.2f} ms | {1e3 * per['broadcast']:.2f} ms "
                     f"| {slow or '-'} against {max(1.0, int(k) / inputs['cores']):.2f} |")
    lines += ["", "| model | codec | encode | decode | mean, 1st row | each further row |", "|---|---|---:|---:|---:|---:|"]
    for model, specs in inputs["codec"].items():
        for spec, r in specs.items():
            lines.append(f"| {model} | {spec} | " + " | ".join(f"{1e9 * r[key]:.2f} ns" for key in ("encode", "decode", "mean_1", "mean_row")) + " |")
    return lines


def validation_table(results: Sequence[dict]) -> List[str]:
    """Row by row: measured, predicted (compute + latency + transfer), ratio, within 25 %."""
    lines = ["| file | rate | topology | model | K | variant | measured s | predicted s | compute + latency + transfer | ratio | within 25 % |",
             "|---|---|---|---|---:|---|---:|---:|---|---:|:---:|"]
    for r in results:
        head = f"| {r['file']} | {r['rate']} | {r.get('topology', 'loopback')} | {r['model']} | {r['workers']} | {r['variant']} | {r['step_s']:.3f} |"
        if r["predicted"] is None:
            lines.append(head + " – | no measured input for this model, variant or K | – | – |")
            continue
        terms = f"{r['compute']:.3f} + {r['latency']:.3f} + {r['transfer']:.3f}"
        lines.append(head + f" {r['predicted']:.3f} | {terms} | {r['ratio']:.2f} | {'yes' if r['ok'] else '**no**'} |")
    done = [r for r in results if r["predicted"] is not None]
    ratios = np.array([r["ratio"] for r in done])
    lines += ["", f"{sum(r['ok'] for r in done)} of {len(done)} rows within 25 %; ratio predicted / measured: median "
              f"{np.median(ratios):.2f}, range {ratios.min():.2f}-{ratios.max():.2f}."]
    return lines


def steps_at_scale(args, rates: Dict[str, Dict[str, float]]) -> Dict[tuple, cm.Scaled]:
    """Every (workload, variant, K) of the predictions, as functions of the bandwidth."""
    out = {}
    for work in cm.workloads():
        for name in dict.fromkeys(BASELINES + SAEF + LOCO):
            for k in K_SWEEP:
                out[work.name, name, k] = cm.scaled_step(work, name, k, args.latency_us * 1e-6, rates, args.codec_speedup)
    return out


def prediction_table(steps: Dict[tuple, cm.Scaled]) -> List[str]:
    names = BASELINES + SAEF
    lines = ["| model | K | Gbit/s | " + " | ".join(cm.VARIANTS[n].label for n in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for work in cm.workloads():
        for k in TABLE_K:
            for g in TABLE_GBIT:
                times = [float(steps[work.name, n, k].time(g * 1e9)) for n in names]
                best = min(times)
                cells = [f"**{t:.3f}**" if t == best else f"{t:.3f}" for t in times]
                lines.append(f"| {work.name} | {k} | {g} | " + " | ".join(cells) + " |")
    return lines


def crossover_table(steps: Dict[tuple, cm.Scaled]) -> List[str]:
    """Per saef variant and baseline: the bandwidth (Gbit/s) below which saef's step is the shorter."""
    lines = ["| model | saef variant | faster than | " + " | ".join(f"K={k}" for k in K_SWEEP) + " |",
             "|---|---|---|" + "---:|" * len(K_SWEEP)]
    for work in cm.workloads():
        for name in SAEF:
            for base in BASELINES:
                cells = []
                for k in K_SWEEP:
                    kind, where = cm.crossover(steps[work.name, name, k], steps[work.name, base, k])
                    cells.append(f"< {gbit(where)}" if kind == "below" else {"always": "all", "never": "never"}[kind])
                lines.append(f"| {work.name} | {cm.VARIANTS[name].label} | {cm.VARIANTS[base].label} | " + " | ".join(cells) + " |")
    return lines


def loco_table(steps: Dict[tuple, cm.Scaled], work: cm.Workload) -> List[str]:
    """Seconds per (inner) step of the per-step variants and the DiLoCo family on ``work``; a round of H
    local steps takes H times as long."""
    lines = ["| K | Gbit/s | " + " | ".join(cm.VARIANTS[n].label for n in LOCO) + " |", "|---:|---:|" + "---:|" * len(LOCO)]
    for k in TABLE_K:
        for g in LOCO_GBIT:
            times = [float(steps[work.name, n, k].time(g * 1e9)) for n in LOCO]
            lines.append(f"| {k} | {g:g} | " + " | ".join(f"**{t:.3f}**" if t == min(times) else f"{t:.3f}" for t in times) + " |")
    return lines


def loco_crossover_table(steps: Dict[tuple, cm.Scaled], work: cm.Workload) -> List[str]:
    """Per variant that communicates rarely: the bandwidth (Gbit/s) below which its step is shorter than
    DDP's (fp32 AdamW and bf16), at each K."""
    lines = ["| variant | faster than | " + " | ".join(f"K={k}" for k in K_SWEEP) + " |", "|---|---|" + "---:|" * len(K_SWEEP)]
    for name in (n for n in LOCO if cm.VARIANTS[n].local_steps > 1):
        for base in ("ddp-adamw-fp32", "ddp-bf16"):
            cells = []
            for k in K_SWEEP:
                kind, where = cm.crossover(steps[work.name, name, k], steps[work.name, base, k], low=1e7)
                cells.append(f"< {gbit(where)}" if kind == "below" else {"always": "all", "never": "never"}[kind])
            lines.append(f"| {cm.VARIANTS[name].label} | {cm.VARIANTS[base].label} | " + " | ".join(cells) + " |")
    return lines


def loco_section(args, steps: Dict[tuple, cm.Scaled], rates: dict) -> List[str]:
    """The predictions with local steps, for the 1.3B transformer."""
    gpt = cm.workloads()[1]
    loco = cm.VARIANTS["saef-loco"]
    bytes_of = {n: steps[gpt.name, n, 8].volume * cm.VARIANTS[n].local_steps for n in ("ddp-adamw-fp32", "saef-loco")}  # per exchange
    stand_in = cm.codec_key(loco) not in rates
    return [
        "## Communicating rarely: local steps on the 1.3B transformer", "",
        "The DiLoCo family (`saef reproduce loco`; docs/results/loco.md measures it on the byte-level GPT) takes H "
        "local steps and then exchanges once, so a step pays 1 / H of the exchange. The exchange cannot overlap the "
        "backward pass (the pseudo-gradient exists only after the round's last step), so a step is compute + "
        "(codec + latency + bytes / bandwidth) / H. DiLoCo is modelled as its all-reduce implementations run it: the fp32 "
        "(or bf16) pseudo-gradient all-reduced as DDP does a gradient (ring, in the same buckets; saef's own DiLoCo sends it "
        "through the sharded server instead); SparseLoCo-style EF and SAEF-LoCo send the same payloads (top-k 2 % per "
        "chunk of 4096 with 2-bit values: "
        f"{8 * bytes_of['saef-loco'] / sum(map(cm.numel, gpt.shapes)):.3f} bits per parameter through the busiest link "
        f"at K = 8, against fp32 DDP's {8 * bytes_of['ddp-adamw-fp32'] / sum(map(cm.numel, gpt.shapes)):.1f}) "
        "through saef's sharded server both ways, so one column stands for both. The per-step variants are as above "
        "(AdamW does not change what DDP moves). "
        + ("saef's encode/decode of the chunked top-k uses top-k 1 %'s measured rates (the inputs predate it; "
           "`--measure` measures it)." if stand_in else "saef's encode/decode of the chunked top-k is measured (`cost_inputs.json`)."),
        "",
        "How long a step takes is only half of the answer: a method that needs more steps to reach a loss loses that "
        "factor. docs/results/loco.md gives the measured losses at equal tokens.", "",
        f"Predicted seconds per step (a round is H steps; the shortest in bold), {gpt.name}:", "",
        *loco_table(steps, gpt), "",
        "Bandwidth (Gbit/s) below which the variant's step is shorter than DDP's (\"all\": over all of 0.01-1000 Gbit/s):", "",
        *loco_crossover_table(steps, gpt), "",
        "![predicted step time with local steps](cost_model_loco.png)", ""]


def figure(steps: Dict[tuple, cm.Scaled], path, ks=(8, 64, 1024), names=BASELINES + SAEF, works=None,
           title="Predicted step time, switched full-duplex links (shaded: 1-100 Gbit/s)") -> None:
    """Step time against bandwidth, one panel per (workload, K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = works or cm.workloads()
    fig, axes = plt.subplots(len(works), len(ks), figsize=(4.2 * len(ks), 3.6 * len(works)), sharex=True, squeeze=False)
    grid = np.logspace(7 if names == LOCO else 8, 11.3, 200)
    for row, work in enumerate(works):
        for col, k in enumerate(ks):
            ax = axes[row][col]
            for name in names:
                style = "--" if cm.VARIANTS[name].scheme in ("ring", "powersgd") else "-"
                ax.loglog(grid / 1e9, steps[work.name, name, k].time(grid), style, label=cm.VARIANTS[name].label)
            ax.axvspan(1, 100, color="0.93", zorder=0)
            ax.set_title(f"{work.name}, K = {k}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if row == len(works) - 1:
                ax.set_xlabel("per-worker link bandwidth (Gbit/s)")
            if col == 0:
                ax.set_ylabel("predicted step (s)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layer_facts(work: cm.Workload, k: int) -> dict:
    sizes = [cm.numel(s) for s in work.shapes]
    owned = cm.per_owner(sizes, cm.owners(sizes, k, "sharded"), k)
    return {"P": sum(sizes), "L": len(sizes), "largest": max(sizes), "owned_max": owned.max(),
            "idle": int((owned == 0).sum()), "balanced_from": sum(sizes) / max(sizes)}


def speed_check(results: Sequence[dict]) -> List[str]:
    """A diagnostic, not part of the model: in rows where compute is most of the predicted step, the
    measured step less the predicted communication, over the compute measured today. Far from 1, the
    machine ran at another speed the day the row was measured."""
    groups: Dict[tuple, list] = {}
    for r in results:
        if r["predicted"] is not None and r["compute"] >= 0.7 * r["predicted"]:
            implied = (r["step_s"] - r["latency"] - r["transfer"]) / r["compute"]
            groups.setdefault((r["file"], r["model"]), []).append(implied)
    lines = ["| file | model | compute-bound rows | (measured - predicted communication) / the inputs' compute, median (range) |",
             "|---|---|---:|---|"]
    for (file, model), values in groups.items():
        lines.append(f"| {file} | {model} | {len(values)} | {np.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) |")
    return lines


def hierarchical_s(work: cm.Workload, name: str, k: int, g: int, bandwidth_bps: float, alpha_s: float,
                   rates: dict, codec_speedup: float, node_bps: float = 2.4e12) -> float:
    """A what-if for the design note, from the same formulas: nodes of ``g`` ranks joined at ``node_bps``
    (NVLink-class). A dense reduce-scatter within the node leaves each rank 1/g of the node's sum; the
    K/g ranks of one local index (one per node) run the sharded exchange on that 1/g, cut into K/g equal
    chunks (balanced owners); a dense all-gather within the node ends the step."""
    total, nodes = sum(map(cm.numel, work.shapes)), k // g
    chunk = math.ceil(total / g / nodes)
    rail = cm.Workload(work.name, [(chunk,)] * nodes, 0, work.compute_s, "")
    intra = 2 * (g - 1) / g * 4 * total * 8 / node_bps + 2 * (g - 1) * alpha_s
    return float(cm.scaled_step(rail, name, nodes, alpha_s, rates, codec_speedup).time(bandwidth_bps)) + intra


def design_note(args, steps: Dict[tuple, cm.Scaled], rates: dict) -> List[str]:
    alpha, bw = args.latency_us * 1e-6, 10e9
    lines = ["## Design note: where the sharded server stops scaling, and what it would take", ""]
    for work in cm.workloads():
        f8, f1024 = _layer_facts(work, 8), _layer_facts(work, 1024)
        sign = sum(cm.server_bits(cm.VARIANTS["saef-sign"], work.shapes)) / 8
        largest = cm.sign_bits(f1024["largest"]) / 8
        lines += [f"**{work.name}** ({f8['P'] / 1e6:.1f}M parameters in {f8['L']} tensors, the largest {f8['largest'] / 1e6:.2f}M; "
                  f"sign payload {sign / 1e6:.2f} MB per direction):", "",
                  f"- *Latency.* Each of the two all-to-alls costs every rank K - 1 messages: 2 (K - 1) alpha = "
                  f"{1e3 * 2 * 7 * alpha:.2f} ms at K = 8 and {1e3 * 2 * 1023 * alpha:.1f} ms at K = 1024 (alpha = {args.latency_us:g} us), "
                  f"against a tree all-reduce's 2 ceil(log2 K) rounds ({1e3 * 2 * 10 * alpha:.2f} ms at K = 1024). With equal shares a "
                  f"message carries {sign / 1e3:.0f} kB / K; it falls below alpha B = {alpha * bw / 8 / 1e3:.0f} kB (10 Gbit/s) "
                  f"from K = {sign / (alpha * bw / 8):.0f}, and past that the exchange is paid in latency, not bytes.",
                  f"- *Whole layers.* A layer is served by one rank, so the busiest owner holds at least the largest tensor: "
                  f"once P / K < {f8['largest'] / 1e6:.2f}M (K > {f8['balanced_from']:.0f}) the shares stop shrinking. It receives "
                  f"(K - 1) payloads of its layers on the uplink and sends (K - 1) on the downlink: at K = 1024, "
                  f"{1023 * largest / 1e6:.0f} MB each way for the largest tensor alone (sign), against "
                  f"{sign / 1e6:.2f} MB per rank if shares were equal -- {1023 * largest * 8 / 1e9:.1f} s at 1 Gbit/s -- and it "
                  f"averages K rows of them: server work grows with K instead of staying at P / K per rank.",
                  f"- *Idle servers.* With K above {f8['L']} tensors, ranks own nothing: {f1024['idle']} of 1024 at K = 1024.", ""]
    lines += _note_numbers(args, steps, rates, alpha)
    return lines


def _note_numbers(args, steps, rates, alpha) -> List[str]:
    res, gpt = cm.workloads()
    t = {(w.name, n, k): float(steps[w.name, n, k].time(10e9)) for w in (res, gpt) for n in ("ddp-bf16", "saef-sign") for k in (8, 64, 1024)}
    rank0 = {k: float(cm.scaled_step(res, "saef-sign-rank0", k, alpha, rates, args.codec_speedup).time(10e9)) for k in (8, 64)}
    hier = {(w.name, k): hierarchical_s(w, "saef-sign", k, 8, 10e9, alpha, rates, args.codec_speedup) for w in (res, gpt) for k in (64, 1024)}
    return [
        f"In the model, at 10 Gbit/s, saef sign's step on ResNet-50 goes from {t[res.name, 'saef-sign', 8]:.3f} s (K = 8) to "
        f"{t[res.name, 'saef-sign', 64]:.3f} s (K = 64) and {t[res.name, 'saef-sign', 1024]:.3f} s (K = 1024), while DDP bf16 "
        f"stays at {t[res.name, 'ddp-bf16', 8]:.3f}-{t[res.name, 'ddp-bf16', 1024]:.3f} s; for the 1.3B transformer, "
        f"{t[gpt.name, 'saef-sign', 8]:.2f}, {t[gpt.name, 'saef-sign', 64]:.2f} and {t[gpt.name, 'saef-sign', 1024]:.2f} s "
        f"against DDP bf16's {t[gpt.name, 'ddp-bf16', 8]:.2f}-{t[gpt.name, 'ddp-bf16', 1024]:.2f} s. The rank-0 server "
        f"(every layer at rank 0) is worse from the start: {rank0[8]:.3f} s at K = 8 and {rank0[64]:.3f} s at K = 64 on ResNet-50.", "",
        "**What it would take: hierarchical aggregation** (not built):", "",
        "1. *Within a node* (G ranks on NVLink-class links), a dense reduce-scatter: each rank holds 1/G of the node's "
        "summed gradient. Error feedback then runs per node (a node is one worker of the paper, with G times the batch), "
        "which also divides the number of error vectors by G.",
        "2. *Between nodes*, the K/G ranks of the same local index (one per node, a rail) run today's sharded exchange on "
        "their 1/G of the model: K/G - 1 messages per all-to-all instead of K - 1, each G times larger, so messages stay "
        "above alpha B for G times more workers.",
        "3. *Balanced owners*: cut the rail's 1/G of the model into K' = K / G equal chunks instead of serving whole "
        "layers, so every owner receives K' - 1 chunks of P / (G K') elements per direction whatever the layer sizes; "
        "sign would then scale per chunk (one more 32-bit scale per chunk, and a finer scale).",
        "4. *Within the node again*, a dense all-gather of the decoded update.",
        "",
        f"Estimated with the same formulas (G = 8, node links 2.4 Tbit/s, inter-node 10 Gbit/s per rank, saef sign): ResNet-50 "
        f"{hier[res.name, 64]:.3f} s at K = 64 and {hier[res.name, 1024]:.3f} s at K = 1024 (flat: "
        f"{t[res.name, 'saef-sign', 64]:.3f} and {t[res.name, 'saef-sign', 1024]:.3f} s); the 1.3B transformer "
        f"{hier[gpt.name, 64]:.2f} and {hier[gpt.name, 1024]:.2f} s (flat: {t[gpt.name, 'saef-sign', 64]:.2f} and "
        f"{t[gpt.name, 'saef-sign', 1024]:.2f} s). Beyond that, overlapping the exchange with the backward pass (part 1 of "
        "issue 16) would hide it the way DDP hides its all-reduce, and a log-round all-to-all (Bruck) would trade bytes "
        "for latency where messages are small."]


def document(args, inputs: dict, results: Sequence[dict], steps: Dict[tuple, cm.Scaled], command: str) -> List[str]:
    """The whole of cost_model.md."""
    works = cm.workloads()
    return [
        "# Cost model: validation on the measured network tables, predictions to 1024 workers", "",
        f"Made by `{command}` (`--measure` first to re-measure the inputs: `cost_inputs.json`). The model and its "
        "formulas are in the docstring of `benchmarks/cost_model.py`.", "",
        "## Validation: the measured setup is a shared medium", "",
        "In `bench_network.py` all K ranks run in one network namespace and talk over its loopback, whose single "
        "`tc tbf` queue (burst 256 KiB, MTU 9000) limits the *total* traffic of all ranks: the model treats it as one "
        "shared link, every byte any rank sends crossing it once, plus TCP framing (x" + f"{cm.FRAMING:.4f}). "
        "Two-host rows (a `topology` like `2x2`) are modelled with memory speed within a host and one limited link each "
        "way between hosts. Compute: each variant's step measured without a network on one process, times the slowdown of "
        f"K ranks sharing this machine's cores (`--cpu-sharing {args.cpu_sharing}`: "
        + ("measured with K processes computing at once" if args.cpu_sharing == "measured" else "max(1, K / cores)")
        + ") (DDP's overlap of its all-reduce with the backward pass is not "
        "counted: its first bucket of 1 MiB holds nearly all of ResNet-20 and the MLP's two last layers); latency: gloo's measured cost per "
        "collective at that K; saef's encode/decode from per-element rates. Rows are read from every "
        "`results/network*.json`; top-k rows without a `topk_index` key are taken to send "
        f"{args.topk_index} indices (`--topk-index {args.topk_index}`; rows measured before commit 002648e sent explicit ones).", "",
        *validation_table(results), "",
        "The compute-bound rows tell how fast the machine was when each file was measured, against the inputs "
        "measured for this report (a diagnostic only; nothing in the model is fitted to it):", "",
        *speed_check(results), "",
        "This 2-core machine's speed moves from day to day and with what else runs on it (README: twice as fast on "
        "one day as on another), so a row is only comparable with inputs measured beside it: where a file's median "
        "above is far from 1, its compute-bound rows miss by about that factor, while its communication-bound rows "
        "(the MLP's DDP rows, and saef's at 100 Mbit/s) test the network model whatever the day. "
        + ("`network_costcheck.json` holds rows measured right after this report's `--measure` (bench_network.py's "
           "own `run_variant`, in a private namespace): they test the whole model. "
           if any(r["file"] == "network_costcheck.json" for r in results) else "")
        + "To validate again, run `bench_network.py` and `cost_model.py --measure` back to back on a quiet machine.", "",
        *inputs_table(inputs), "",
        "## Predictions: switched full-duplex links, one per worker", "",
        "Assumptions, all stated, none fitted:", "",
        "- Every worker has its own full-duplex link of the given bandwidth into a non-blocking switch; a collective "
        "takes its busiest link's bytes / bandwidth (no framing overhead) plus its message rounds times alpha = "
        f"{args.latency_us:g} us (`--latency-us`): K - 1 per all-to-all, min(2 (K - 1), 2 ceil(log2 K)) per all-reduce "
        "(a ring's bandwidth with the better of a ring's and a tree's latency, generous to DDP).",
        *[f"- {w.name}: {w.note}." for w in works],
        "- DDP (fp32, bf16, PowerSGD rank 4): buckets of 25 MiB (the first 1 MiB), one all-reduce per bucket "
        "(PowerSGD: three, of the uncompressed 1-D tensors, P and Q), overlapped with the backward pass (2/3 of the "
        "compute) as well as DDP can at best; PowerSGD adds five passes over the fp32 gradient at 1.5 TB/s.",
        f"- saef (sharded server, double-way, as today: no overlap): compute, then its encode/decode, then the vote, "
        f"the uplink and the downlink. Encode/decode: the per-element rates measured here on mlp5m's layers "
        f"(4.9M elements, the closest to these models' layer sizes) divided by {args.codec_speedup:g} "
        "(`--codec-speedup`: a GPU's memory-bound kernels against this 2-core CPU). "
        "Top-k: indices in the library's Elias-Fano code where it is shorter (`saef.compress.indexcode.coded_bits`); "
        "fp16: its values in 16 bits.", "",
        "Predicted step (s; the shortest in bold):", "",
        *prediction_table(steps), "",
        "Bandwidth (Gbit/s) below which the saef variant's step is shorter than the baseline's (\"all\": over all of "
        "0.1-1000 Gbit/s; \"never\": at none of them):", "",
        *crossover_table(steps), "",
        "![predicted step time against bandwidth](cost_model.png)", "",
        *loco_section(args, steps, inputs["codec"]["mlp5m"]),
        *design_note(args, steps, inputs["codec"]["mlp5m"]),
    ]
