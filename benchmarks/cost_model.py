"""An alpha-beta cost model of one training step: validated on the measured network tables, then used to
predict ResNet-50 and a 1.3B-parameter transformer on 8 to 1024 workers.

    python benchmarks/cost_model.py --measure   # measure the inputs on this machine (about 1 min), then report
    python benchmarks/cost_model.py             # validate + predict from benchmarks/results/cost_inputs.json
    python benchmarks/cost_model.py --latency-us 10 --codec-speedup 1    # other assumptions for the predictions
    python benchmarks/cost_model.py --rows benchmarks/results/network_two_hosts.json --output /tmp/check.md

Prints markdown tables and writes benchmarks/results/cost_model.md and cost_model.png.

One step of a variant is a list of collectives run one after another, each moving a traffic matrix
``traffic[s, d]`` (bytes from rank s to rank d) over a topology's links, plus compute:

    step = compute + codec + sum over collectives c of ( latency_c + max over links l of load_{c,l} / rate_l )

* What each variant sends is derived from the code: saef's sharded server (``saef.backends.distributed``:
  a vote all-reduce, an uplink ``all_to_all`` of each layer's payload to its owner, a downlink
  ``all_to_all`` of each owner's server payload to every rank; owners from ``assign_layers``), the rank-0
  server (the same with rank 0 owning every layer), DDP's ring all-reduce per gradient bucket (fp32 or
  16-bit), and DDP's PowerSGD hook (rank 4: one all-reduce of the 1-D and too-small tensors, then P, then Q).
  Payload bits are the compressors' formats (sign: 8 ceil(d / 8) + 32; top-k: 32 k + the indices, explicit
  ceil(log2 d) bits each or the Elias-Fano code), checked against the real payloads in tests/test_cost_model.py.
* Topologies: :class:`SharedMedium` -- the measured setup, all K ranks in one network namespace whose
  loopback has one token bucket (tc tbf, burst 256 KiB), so the *total* bytes of all ranks share the rate;
  :class:`TwoHosts` -- ranks split over hosts, memory speed within a host, one rate-limited link each way
  between hosts (benchmarks/bench_two_hosts.py); :class:`Switched` -- every worker on its own full-duplex
  link of the given bandwidth into a non-blocking switch, for the predictions at scale.
* Latency: on the measured setup, the per-collective cost of gloo measured on this machine's loopback at
  that K (``--measure``); at scale, ``alpha`` per message round: (K - 1) alpha for an all-to-all (each rank
  sends K - 1 messages), the cheaper of a ring's 2 (K - 1) and a tree's 2 ceil(log2 K) rounds for an
  all-reduce (with the ring's bandwidth term), ceil(log2 K) for a broadcast.
* Compute, measured: each variant's step on one process without a network (one thread, the local batch
  of benchmarks/_net_worker.py), times the CPU sharing of the K ranks of a measured row on this machine's
  cores: the measured slowdown of K processes computing at once (``--cpu-sharing measured``), or
  max(1, K / cores) (``--cpu-sharing cores``). saef's server work scales with what a rank owns, so its
  encode/decode time is modelled from per-element rates measured on the model's layers (:func:`saef_codec_s`).
* At scale, compute is an assumption per workload (:func:`workloads`), DDP's all-reduces overlap its backward
  pass at best, and saef's encode/decode runs ``--codec-speedup`` times faster than measured here (a GPU).

The measured inputs come from benchmarks/_cost_measure.py; the tables, figure and design note from
benchmarks/_cost_report.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
INPUTS = RESULTS / "cost_inputs.json"
GLOBAL_BATCH = 128  # benchmarks/_net_worker.py: --batch 128, split over the K ranks
TBF_BURST = 256 * 1024  # bytes: bench_network.py's "burst 256kb"
MTU = 9000  # bench_network.py sets the loopback's MTU to 9000
# Bytes on the wire per payload byte over TCP at this MTU: each segment carries MTU - 52 bytes of payload
# (IPv4, TCP with timestamps) in MTU + 14 bytes (Ethernet header of lo), and a 66 + 14 byte ACK every two
# segments also passes the token bucket.
FRAMING = (MTU + 14 + 40) / (MTU - 52)

Shape = Tuple[int, ...]


# --- layer lists ------------------------------------------------------------------------------------
def resnet50_shapes(num_classes: int = 1000) -> List[Shape]:
    """Parameter shapes of ResNet-50 (torchvision's layout, bottleneck blocks 3-4-6-3): 25,557,032 for
    1000 classes. Every BatchNorm has a weight and a bias."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:  # the projection shortcut
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    return shapes + [(num_classes, 2048), (num_classes,)]


def transformer_shapes(layers: int = 24, width: int = 2048, vocabulary: int = 50257, context: int = 2048) -> List[Shape]:
    """Parameter shapes of a GPT-2-style decoder like saef's ``gpt`` (pre-LayerNorm blocks, 4x MLP, output
    tied to the token embedding): 1,315,723,264 parameters for the defaults (24 layers, width 2048)."""
    shapes: List[Shape] = [(vocabulary, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


@functools.lru_cache(maxsize=None)
def zoo_shapes(name: str) -> Tuple[List[Shape], int]:
    """Parameter shapes and the number of floating-point buffer elements of a saef zoo model, as the
    network benchmark builds it (mlp5m on MNIST-1D, resnet20 on 32x32 images, the default gpt)."""
    from types import SimpleNamespace

    from saef.zoo.models import build_model

    data = {"mlp5m": SimpleNamespace(num_classes=10, input_shape=(1, 40), name="mnist1d"),
            "resnet20": SimpleNamespace(num_classes=10, input_shape=(3, 32, 32), name="images"),
            "gpt": SimpleNamespace(num_classes=256, input_shape=(64,), name="text")}[name]
    model = build_model(name, data)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return [tuple(p.shape) for p in model.parameters()], buffers


def numel(shape: Shape) -> int:
    return math.prod(shape)


# --- what goes on the wire ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """How a variant communicates. ``scheme``: ``"ring"`` (DDP's all-reduce of ``value_bits`` values),
    ``"powersgd"`` (DDP's PowerSGD hook, rank ``rank``), ``"sharded"`` or ``"rank0"`` (saef's server,
    ``compressor`` both ways: ``"sign"`` or ``"topk"`` keeping ``rho`` with ``value_bits`` values and
    ``index`` = ``"coded"`` (the library's format since 002648e: Elias-Fano where shorter) or ``"explicit"``
    (ceil(log2 d) bits each, the format before) indices; with ``chunk`` > 0, top-k per chunk of that many
    entries, and with ``low_bits`` > 0 its values as b-bit levels with an fp32 scale per 64).
    ``local_steps`` H: the exchange runs once every H steps (the DiLoCo family: H inner steps, then the
    pseudo-gradient), so a step pays 1 / H of it."""

    scheme: str
    label: str
    value_bits: int = 32
    compressor: str = ""
    rho: float = 0.01
    index: str = "explicit"
    rank: int = 4
    chunk: int = 0
    low_bits: int = 0
    local_steps: int = 1


VARIANTS: Dict[str, Variant] = {
    "ddp-fp32": Variant("ring", "DDP fp32"),
    "ddp-fp16": Variant("ring", "DDP fp16", 16),
    "ddp-bf16": Variant("ring", "DDP bf16", 16),
    "ddp-powersgd": Variant("powersgd", "PowerSGD r=4"),
    "saef-sign": Variant("sharded", "saef sign", compressor="sign"),
    "saef-ef-sign": Variant("sharded", "saef EF sign", compressor="sign"),
    "saef-topk": Variant("sharded", "saef top-k 1%", compressor="topk", index="coded"),
    "saef-topk-fp16": Variant("sharded", "saef top-k 1% fp16", 16, "topk", index="coded"),
    "saef-sign-rank0": Variant("rank0", "saef sign, rank-0 server", compressor="sign"),
    # the GPT's Adam variants move what their SGD counterparts move
    "ddp-adamw-fp32": Variant("ring", "DDP AdamW fp32"),
    "ddp-adamw-fp16": Variant("ring", "DDP AdamW fp16", 16),
    "ddp-adamw-powersgd": Variant("powersgd", "DDP AdamW PowerSGD r=4"),
    "saef-1bit-adam": Variant("sharded", "saef 1-bit Adam", compressor="sign"),
    "saef-adam": Variant("sharded", "SAEF-Adam", compressor="sign"),
    # communicating rarely (saef reproduce loco's H and compressor): DiLoCo as all-reduce implementations run it
    # (its pseudo-gradient all-reduced as DDP does a gradient); SparseLoCo-style EF and SAEF-LoCo move the same
    # payloads through saef's server
    "diloco-h16": Variant("ring", "DiLoCo H=16 fp32", local_steps=16),
    "diloco-h64": Variant("ring", "DiLoCo H=64 fp32", local_steps=64),
    "diloco-h64-bf16": Variant("ring", "DiLoCo H=64 bf16", 16, local_steps=64),
    "saef-loco": Variant("sharded", "SAEF-LoCo H=16 top-k 2%/4096 int2", compressor="topk", rho=0.02, chunk=4096,
                         low_bits=2, local_steps=16),
}


def kept(rho: float, d: int) -> int:
    """Top-k's k for a layer of d elements: max(1, floor(rho d)) (saef.compress.base.kept_count)."""
    return min(d, max(1, math.floor(rho * d * (1 + 1e-12)))) if d else 0


def sign_bits(d: int) -> int:
    """Scaled sign: the signs packed 8 to a byte, and one fp32 scale."""
    return 8 * math.ceil(d / 8) + 32


def topk_bits(d: int, rho: float = 0.01, value_bits: int = 32, index: str = "explicit") -> int:
    """Top-k: k values, and the k indices in ceil(log2 d) bits each, padded to a byte (``explicit``, the
    format until commit 002648e), or the smaller of that and the Elias-Fano code (``coded``, since then)."""
    k = kept(rho, d)
    index_bits = k * max(d - 1, 0).bit_length()
    if index == "coded":
        from saef.compress.indexcode import coded_bits

        index_bits = min(index_bits, coded_bits(d, k))
    return k * value_bits + 8 * math.ceil(index_bits / 8)


def low_bit_bits(values: int, bits: int) -> int:
    """``SPEC:intB`` values (saef.compress.lowbit): the levels packed B to a byte's bits, an fp32 scale per
    64 values, and the tensor's shape (one int32: the values of a layer's row are one dimension)."""
    return 8 * math.ceil(values * bits / 8) + 32 * math.ceil(values / 64) + 32


def chunked_topk_bits(d: int, rho: float, chunk: int, value_bits: int = 32, low_bits: int = 0) -> int:
    """Top-k per chunk (``topk:RHO:chunk=N``, saef.compress.chunked): C = ceil(d / n) chunks of n = min(N, d)
    entries keep k = kept(rho, n) each; their C k values, and each index within its chunk in
    ceil(log2 n) bits, packed."""
    n = min(chunk, d)
    kept_values = math.ceil(d / n) * kept(rho, n)
    values = low_bit_bits(kept_values, low_bits) if low_bits else kept_values * value_bits
    return values + 8 * math.ceil(kept_values * max(1, (n - 1).bit_length()) / 8)


def server_bits(variant: Variant, shapes: Sequence[Shape]) -> List[int]:
    """Bits of each layer's payload (uplink and, double-way, downlink alike) for a saef variant."""
    if variant.compressor == "sign":
        return [sign_bits(numel(s)) for s in shapes]
    if variant.chunk:
        return [chunked_topk_bits(numel(s), variant.rho, variant.chunk, variant.value_bits, variant.low_bits) for s in shapes]
    return [topk_bits(numel(s), variant.rho, variant.value_bits, variant.index) for s in shapes]


def powersgd_elements(shapes: Sequence[Shape], rank: int = 4) -> Tuple[int, int, int]:
    """Elements of PyTorch's PowerSGD hook's three all-reduces (uncompressed, P, Q) for one bucket: each
    tensor is viewed as (shape[0], rest); it is compressed to P (n x r) and Q (m x r), r = min(n, m, rank),
    when 2 (n + m) r < n m (min_compression_rate 2), else sent as it is (every 1-D tensor)."""
    plain = p = q = 0
    for shape in shapes:
        n, m = shape[0], numel(shape) // shape[0]
        r = min(n, m, rank)
        if 2 * (n + m) * r < n * m:
            p, q = p + n * r, q + m * r
        else:
            plain += n * m
    return plain, p, q


def ddp_buckets(shapes: Sequence[Shape], first_cap: int = 1 << 20, cap: int = 25 << 20) -> List[List[Shape]]:
    """DDP's gradient buckets (fp32 bytes), filled in reverse parameter order (about the order gradients
    are ready): the first closes past ``first_cap`` bytes, the others past ``cap``."""
    buckets, current, size = [], [], 0
    for shape in reversed(list(shapes)):
        current.append(shape)
        size += 4 * numel(shape)
        if size >= (first_cap if not buckets else cap):
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


# --- collectives: who sends how many bytes to whom -----------------------------------------------------
@dataclass
class Collective:
    """One collective of a step: its kind (for its latency) and ``traffic[s, d]``, bytes from s to d."""

    kind: str  # "all_to_all", "all_reduce" or "broadcast"
    traffic: np.ndarray
    label: str
    count: int = 1  # collectives of this kind and pattern it stands for (each pays the latency once)


def ring_traffic(k: int, nbytes: float) -> np.ndarray:
    """A ring all-reduce of ``nbytes`` per rank (reduce-scatter, then all-gather): rank s sends
    2 (K - 1) / K of it to rank s + 1 (gloo's ring; the rank order is the ring order)."""
    traffic = np.zeros((k, k))
    if k > 1:
        traffic[np.arange(k), (np.arange(k) + 1) % k] = 2 * (k - 1) / k * nbytes
    return traffic


def owners(sizes: Sequence[int], k: int, scheme: str) -> List[int]:
    """The rank serving each layer: saef's own ``assign_layers`` (largest first, to the least-loaded rank)
    for the sharded server, rank 0 for every layer for the rank-0 server."""
    if scheme == "rank0":
        return [0] * len(sizes)
    from saef.backends.distributed import assign_layers

    return assign_layers(sizes, k)


def per_owner(values: Sequence[float], owner: Sequence[int], k: int) -> np.ndarray:
    """The sum of ``values`` over the layers each rank owns, ``(K,)``."""
    return np.bincount(np.asarray(owner, dtype=np.int64), weights=np.asarray(values, dtype=float), minlength=k)


def server_collectives(variant: Variant, shapes: Sequence[Shape], k: int) -> Tuple[List[Collective], np.ndarray]:
    """saef's step on K ranks (``DistributedTrainer.step``): the NaN vote (an all-reduce of one int32), the
    uplink (every rank sends each layer's payload to its owner) and the downlink (each owner sends its
    layers' server payloads to every rank). Also returns the elements each rank owns."""
    sizes = [numel(s) for s in shapes]
    owner = owners(sizes, k, variant.scheme)
    owned_bytes = per_owner([b / 8 for b in server_bits(variant, shapes)], owner, k)
    uplink = np.tile(owned_bytes, (k, 1))  # row s: what s sends to each owner
    np.fill_diagonal(uplink, 0.0)  # a rank's own layers stay in memory
    downlink = uplink.T.copy()  # owner s sends its layers' server payloads to every d
    vote = Collective("all_reduce", ring_traffic(k, 4), "vote")
    return [vote, Collective("all_to_all", uplink, "uplink"), Collective("all_to_all", downlink, "downlink")], \
        per_owner(sizes, owner, k)


def ddp_collectives(variant: Variant, shapes: Sequence[Shape], k: int, buffers: int, one_bucket: bool) -> List[Collective]:
    """DDP's step: the broadcast of the floating-point buffers (BatchNorm statistics) from rank 0 in the
    forward, then per bucket one all-reduce (``ring``) or PowerSGD's three (``powersgd``: the uncompressed
    tensors, P, Q). All the all-reduces are rings over the same ranks, so their traffic is merged into one
    :class:`Collective` whose ``count`` is the number of all-reduces. ``one_bucket``: every gradient in one
    bucket (the network benchmark's PowerSGD runs with bucket_cap_mb=1024)."""
    out = []
    if buffers:  # a pipelined broadcast: each rank passes the buffers on to the next, every rank gets them once
        chain = np.zeros((k, k))
        chain[np.arange(k - 1), np.arange(1, k)] = 4 * buffers
        out.append(Collective("broadcast", chain, "buffers"))
    buckets = [list(shapes)] if one_bucket else ddp_buckets(shapes)
    if variant.scheme == "ring":
        values, count = variant.value_bits / 8 * sum(map(numel, shapes)), len(buckets)
    else:
        values = 4 * sum(sum(powersgd_elements(bucket, variant.rank)) for bucket in buckets)
        count = 3 * len(buckets)
    return out + [Collective("all_reduce", ring_traffic(k, values), "gradients", count)]


# --- topologies: which links a byte from s to d crosses ------------------------------------------------
class SharedMedium:
    """All K ranks talk through one token bucket (the measured setup: one namespace's loopback with
    ``tc tbf rate R burst 256kb``): one link, loaded with every byte any rank sends to another."""

    def __init__(self, k: int, rate_bps: float, burst: float = TBF_BURST, framing: float = FRAMING):
        self.k, self.framing = k, framing
        self.rates, self.bursts = np.array([rate_bps / 8]), np.array([float(burst)])

    def loads(self, traffic: np.ndarray) -> np.ndarray:
        return np.array([traffic.sum() - np.trace(traffic)])


class Switched:
    """Every worker has its own full-duplex link of ``rate_bps`` each way into a non-blocking switch: link
    s (out of s) carries what s sends, link K + d (into d) what d receives."""

    def __init__(self, k: int, rate_bps: float, framing: float = 1.0):
        self.k, self.framing = k, framing
        self.rates, self.bursts = np.full(2 * k, rate_bps / 8), np.zeros(2 * k)

    def loads(self, traffic: np.ndarray) -> np.ndarray:
        off = traffic - np.diag(np.diag(traffic))
        return np.concatenate([off.sum(axis=1), off.sum(axis=0)])


class TwoHosts:
    """Ranks on ``hosts`` hosts of ``per_host`` ranks each (ranks numbered host by host, as torchrun's node
    ranks give them): ranks of one host talk at memory speed, and every ordered pair of hosts has one
    link of ``rate_bps`` carrying all bytes from the first to the second (benchmarks/_hosts.py: a veth pair
    with a token bucket on each end, so each direction has its own rate)."""

    def __init__(self, hosts: int, per_host: int, rate_bps: float, burst: float = TBF_BURST, framing: float = FRAMING):
        self.hosts, self.per_host, self.k, self.framing = hosts, per_host, hosts * per_host, framing
        self.pairs = [(a, b) for a in range(hosts) for b in range(hosts) if a != b]
        self.rates = np.full(len(self.pairs), rate_bps / 8)
        self.bursts = np.full(len(self.pairs), float(burst))

    def loads(self, traffic: np.ndarray) -> np.ndarray:
        host = np.arange(self.k) // self.per_host
        return np.array([traffic[np.ix_(host == a, host == b)].sum() for a, b in self.pairs])


def transfer_s(collectives: Sequence[Collective], topology, idle_s: float = 0.0) -> List[float]:
    """Seconds each collective spends moving bytes: its busiest link's load / rate, after the token bucket
    lets through what it holds (full after ``idle_s`` of compute without traffic, up to the burst)."""
    tokens = np.minimum(topology.bursts, topology.rates * idle_s)
    out = []
    for collective in collectives:
        load = topology.loads(collective.traffic) * topology.framing
        out.append(float(np.max(np.maximum(load - tokens, 0.0) / topology.rates)) if len(load) else 0.0)
        tokens = np.maximum(tokens - load, 0.0)
    return out


def alpha_latency(kind: str, k: int, alpha_s: float) -> float:
    """Message rounds of a collective times ``alpha_s``: an all-to-all sends K - 1 messages per rank; an
    all-reduce takes the cheaper of a ring's 2 (K - 1) rounds and a tree's 2 ceil(log2 K); a broadcast
    ceil(log2 K)."""
    if k <= 1:
        return 0.0
    rounds = {"all_to_all": k - 1, "all_reduce": min(2 * (k - 1), 2 * math.ceil(math.log2(k))),
              "broadcast": math.ceil(math.log2(k))}[kind]
    return rounds * alpha_s


# --- compute ---------------------------------------------------------------------------------------
def saef_codec_s(rates: Dict[str, float], owned: np.ndarray, k: int) -> float:
    """saef's encode/decode seconds on the critical path of a step on K ranks: every rank encodes all P
    elements, the owners average K rows of their layers and encode them for the downlink (the slowest
    owner holds everyone up), and every rank decodes the layers others own.

        enc P + max_r [(mean_1 + mean_per_row (K - 1)) P_r + enc P_r] + max_r dec (P - P_r)

    ``rates``: seconds per element (encode, decode, mean of one row, each further row), measured on the
    model's layers; ``owned``: P_r, elements each rank owns."""
    total = float(owned.sum())
    server = ((rates["mean_1"] + rates["mean_row"] * (k - 1) + rates["encode"]) * owned).max()
    return rates["encode"] * total + server + rates["decode"] * float((total - owned).max())


# --- validation: the measured rows -----------------------------------------------------------------
def parse_rate(rate: str) -> float:
    """tc's rate syntax ("100mbit", "1gbit") in bits per second (tc's k, m, g are powers of 1000)."""
    number = float("".join(c for c in rate if c.isdigit() or c == "."))
    unit = rate.lower().rstrip("bit").lstrip("0123456789.")
    return number * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit]


def row_topology(row: dict):
    """The topology of a measured row: two hosts when it says so (bench_two_hosts.py writes
    ``topology="2xN"``, ``hosts``, ``per_host``), else the one shared loopback of bench_network.py."""
    rate, k = parse_rate(row["rate"]), int(row["workers"])
    hosts = int(row.get("hosts") or 0)
    if not hosts and str(row.get("topology", "")).count("x") == 1:
        hosts = int(str(row["topology"]).split("x")[0])
    if hosts > 1:
        return TwoHosts(hosts, int(row.get("per_host") or k // hosts), rate)
    return SharedMedium(k, rate)


def zoo_step(row: dict, inputs: dict, topk_index: str = "coded", sharing: str = "measured") -> Optional[Dict[str, float]]:
    """The predicted step of a measured row: compute (the variant's measured step without a network at this
    local batch, plus saef's K-dependent server work, times the CPU sharing), gloo's measured latency per
    collective at this K, and the transfers over the row's topology. None when an input is missing."""
    name, model, k = row["variant"], row["model"], int(row["workers"])
    variant = VARIANTS[name]
    if variant.compressor == "topk":
        variant = Variant(**{**variant.__dict__, "index": row.get("topk_index", topk_index)})
    step_1 = inputs["steps"].get(model, {}).get(name, {}).get(str(GLOBAL_BATCH // k))
    latency_of = inputs["collectives"].get(str(k))
    if step_1 is None or latency_of is None:
        return None
    shapes, buffers = zoo_shapes(model)
    if variant.scheme in ("sharded", "rank0"):
        collectives, owned = server_collectives(variant, shapes, k)
        rates = inputs["codec"][model][codec_key(variant)]
        step_1 += saef_codec_s(rates, owned, k) - saef_codec_s(rates, owned.sum(keepdims=True), 1)
    else:
        collectives = ddp_collectives(variant, shapes, k, buffers, one_bucket=variant.scheme == "powersgd")
    compute = step_1 * cpu_sharing(inputs, model, k, sharing)
    latency = sum(latency_of[c.kind] * c.count for c in collectives)
    transfer = sum(transfer_s(collectives, row_topology(row), idle_s=compute))
    return {"compute": compute, "latency": latency, "transfer": transfer, "total": compute + latency + transfer}


def cpu_sharing(inputs: dict, model: str, k: int, how: str = "measured") -> float:
    """How much longer a step's compute takes when the K ranks of a measured row share this machine's
    cores (one thread each). ``measured``: the plain step timed while K processes run it at once, over the
    same step alone (``--measure`` times both; this follows whatever else loads the machine, as the
    measured rows did if they were run beside it); ``cores``, or without that timing: max(1, K / cores)."""
    together = inputs.get("sharing", {}).get(str(k), {}).get(model)
    alone = inputs["steps"].get(model, {}).get("none", {}).get(str(GLOBAL_BATCH // k))
    if how == "cores" or together is None or alone is None:
        return max(1.0, k / inputs["cores"])
    return max(1.0, together / alone)


def codec_key(variant: Variant) -> str:
    """The compressor spec whose measured encode/decode rates a saef variant uses."""
    if variant.compressor == "sign":
        return "sign"
    if variant.chunk:
        return f"topk:{variant.rho:g}:chunk={variant.chunk}" + (f":int{variant.low_bits}" if variant.low_bits else "")
    return f"topk:{variant.rho:g}" + (":fp16" if variant.value_bits == 16 else "")


def codec_rates_of(rates: Dict[str, Dict[str, float]], variant: Variant) -> Dict[str, float]:
    """The measured rates of the variant's compressor; a chunked top-k measured by inputs older than it takes
    plain top-k 1 %'s (the report says so)."""
    key = codec_key(variant)
    return rates[key] if key in rates or not variant.chunk else rates["topk:0.01"]


def measured_rows(paths: Sequence[Path]) -> List[dict]:
    """Every timed row of the given network*.json files (with its file name), skipping failed ones."""
    rows = []
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            if row.get("step_s") is not None and row.get("variant") in VARIANTS:
                rows.append({**row, "file": Path(path).name})
    return rows


def validate(rows: Sequence[dict], inputs: dict, topk_index: str = "coded", sharing: str = "measured",
             tolerance: float = 0.25) -> List[dict]:
    """Predicted against measured, row by row: the terms, the ratio predicted / measured, and whether it
    is within ``tolerance``."""
    out = []
    for row in rows:
        terms = zoo_step(row, inputs, topk_index, sharing)
        if terms is None:
            out.append({**row, "predicted": None})
            continue
        ratio = terms["total"] / row["step_s"]
        out.append({**row, **terms, "predicted": terms["total"], "ratio": ratio, "ok": abs(ratio - 1) <= tolerance})
    return out


# --- predictions at scale ---------------------------------------------------------------------------
@dataclass
class Workload:
    """A model to predict: its parameter shapes, buffers, and the assumed compute of one step per worker."""

    name: str
    shapes: List[Shape]
    buffers: int
    compute_s: float
    note: str


def workloads() -> List[Workload]:
    """ResNet-50 and the 1.3B transformer, with the compute assumptions stated in the report."""
    resnet = resnet50_shapes()
    gpt = transformer_shapes()
    params = sum(map(numel, gpt))
    tokens, flops = 8 * 2048, 125e12
    return [Workload("ResNet-50", resnet, sum(numel(s) for s in resnet if len(s) == 1) - 1000, 0.100,
                     "batch 32 images per worker, 0.100 s per step (fp32, V100-class GPU, about 320 images/s)"),
            Workload("GPT 1.3B", gpt, 0, 6 * params * tokens / flops,
                     f"8 sequences x 2048 tokens per worker, 6 N T = {6 * params * tokens:.3g} FLOP at "
                     f"{flops / 1e12:.0f} TFLOP/s achieved (A100-class bf16 at 40 % of peak)")]


@dataclass
class Scaled:
    """A variant's step on K switched workers as a function of the link bandwidth B (bytes/s):
    ``fixed + volume / B`` seconds, or, for DDP (overlapped with backward),
    ``forward + max(backward, latency + volume / B) + extra``."""

    fixed: float
    latency: float
    volume: float  # bytes through the busiest link, summed over collectives
    overlap: Optional[Tuple[float, float, float]] = None  # (forward, backward, extra) for DDP

    def time(self, bandwidth_bps):
        comm = self.latency + self.volume * 8 / np.asarray(bandwidth_bps, dtype=float)
        if self.overlap is None:
            return self.fixed + comm
        forward, backward, extra = self.overlap
        return forward + np.maximum(backward, comm) + extra


def scaled_step(work: Workload, name: str, k: int, alpha_s: float, rates: Dict[str, Dict[str, float]],
                codec_speedup: float, hbm_bytes_s: float = 1.5e12) -> Scaled:
    """The step of variant ``name`` for ``work`` on K switched workers. saef: compute, then its codec (the
    measured per-element rates / ``codec_speedup``), then its collectives, in sequence (no overlap today).
    DDP: its all-reduces overlap the backward pass (2/3 of the compute), as DDP's buckets allow at best;
    PowerSGD adds five passes over the fp32 gradient at ``hbm_bytes_s`` (its matrix products and error
    feedback, memory-bound at rank 4). With local steps H, one exchange (and codec) follows every H-th
    step, after it (no overlap: the pseudo-gradient exists only then), so a step pays 1 / H of it."""
    variant = VARIANTS[name]
    h = variant.local_steps
    if variant.scheme in ("sharded", "rank0"):
        collectives, owned = server_collectives(variant, work.shapes, k)
        codec = saef_codec_s(codec_rates_of(rates, variant), owned, k) / codec_speedup
    else:
        collectives = ddp_collectives(variant, work.shapes, k, work.buffers, one_bucket=False)
    latency = sum(alpha_latency(c.kind, k, alpha_s) * c.count for c in collectives)
    volume = sum(transfer_s(collectives, Switched(k, 8.0)))  # seconds at 1 byte/s = bytes
    if variant.scheme in ("sharded", "rank0"):
        return Scaled(work.compute_s + codec / h, latency / h, volume / h)
    if h > 1:
        return Scaled(work.compute_s, latency / h, volume / h)
    extra = 5 * 4 * sum(map(numel, work.shapes)) / hbm_bytes_s if variant.scheme == "powersgd" else 0.0
    return Scaled(0.0, latency, volume, (work.compute_s / 3, 2 * work.compute_s / 3, extra))


def crossover(saef: Scaled, base: Scaled, low: float = 1e8, high: float = 1e12) -> Tuple[str, Optional[float]]:
    """Where saef stops being faster than ``base`` as the bandwidth grows: ("below", B) with B the
    crossover in bit/s, ("always", None) when saef is faster over all of [low, high], ("never", None)."""
    grid = np.logspace(math.log10(low), math.log10(high), 401)
    faster = saef.time(grid) < base.time(grid)
    if faster.all():
        return "always", None
    if not faster[0]:
        return "never", None
    return "below", float(grid[np.argmin(faster)])


# --- command line ----------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help=f"measure the inputs first (writes {INPUTS.relative_to(HERE.parent)})")
    parser.add_argument("--inputs", type=Path, default=INPUTS)
    parser.add_argument("--latency-us", type=float, default=20.0, help="predictions: alpha, seconds per message round (default 20 us)")
    parser.add_argument("--codec-speedup", type=float, default=20.0,
                        help="predictions: saef's encode/decode on a GPU this many times faster than measured here (default 20)")
    parser.add_argument("--topk-index", choices=("explicit", "coded"), default="coded",
                        help="top-k's index format of measured rows without a topk_index key (explicit: rows measured before 002648e)")
    parser.add_argument("--cpu-sharing", choices=("measured", "cores"), default="measured",
                        help="validation: K ranks' slowdown on this machine's cores, measured, or max(1, K / cores)")
    parser.add_argument("--rows", type=Path, nargs="+", default=None,
                        help="measured rows to validate against (default: every benchmarks/results/network*.json)")
    parser.add_argument("--output", type=Path, default=RESULTS / "cost_model.md")
    args = parser.parse_args(argv)
    if args.measure:
        from _cost_measure import measure

        measure(args.inputs)
    if not args.inputs.exists():
        sys.exit(f"{args.inputs} is missing: run python benchmarks/cost_model.py --measure first")
    import _cost_report as report

    inputs = json.loads(args.inputs.read_text())
    results = validate(measured_rows(args.rows or sorted(RESULTS.glob("network*.json"))), inputs, args.topk_index, args.cpu_sharing)
    steps = report.steps_at_scale(args, inputs["codec"]["mlp5m"])
    report.figure(steps, args.output.with_suffix(".png"))
    report.figure(steps, args.output.with_name(args.output.stem + "_loco.png"), names=report.LOCO, works=workloads()[1:],
                  title="Predicted step time with local steps, 1.3B transformer, switched links (shaded: 1-100 Gbit/s)")
    text = "\n".join(report.document(args, inputs, results, steps, " ".join(["python benchmarks/cost_model.py"] + list(argv or sys.argv[1:]))))
    args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
