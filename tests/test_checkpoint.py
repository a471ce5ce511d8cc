"""Checkpoints and resume: a run killed with SIGKILL anywhere (even mid-checkpoint) and resumed ends
bit-identical to an uninterrupted run; damaged or mismatched checkpoints are refused or skipped clearly."""

import csv
import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import saef
from saef.app import checkpoint
from saef.app.cli import main
from saef.app.records import METRIC_COLUMNS
from saef.core import NonFiniteStep

SRC = str(Path(__file__).parent.parent / "src")
FAULTS = str(Path(__file__).parent / "_faults.py")  # saef with a fault injected where SAEF_FAULT says
# Only the runs that are killed need a process of their own: uninterrupted references and resumes run the
# same command line in this process (main), which saves a Python and torch start-up each.
# synthetic: 512 samples, batch 32 -> 16 steps per epoch, 64 steps; checkpoints every 5 steps and per epoch
RUN = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--epochs", "4", "--checkpoint-every", "5",
       "--compressor", "topk:0.1", "--average-every", "3", "--quiet"]
TIMES = ("epoch_time", "wall_time")


def saef_cli(args, fault=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SAEF_FAULT", None)
    if fault:
        env["SAEF_FAULT"] = fault
    return subprocess.run([sys.executable, FAULTS, *args], env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


def final_state(run_dir):
    return checkpoint.load_latest(Path(run_dir) / "checkpoints")["trainer"]


def assert_identical(a, b):
    assert records(a) == records(b)
    sa, sb = final_state(a), final_state(b)
    assert torch.equal(sa["x"], sb["x"])
    tensors_a, tensors_b = sa["algorithm"]["tensors"], sb["algorithm"]["tensors"]
    assert tensors_a.keys() == tensors_b.keys() and {"worker_momentum", "momentum", "local_iterate"} & set(tensors_a)  # (sgd's, adam's, rounds')
    counters = ("step", "round_position", "inner_steps")
    assert [sa["algorithm"][c] for c in counters] == [sb["algorithm"][c] for c in counters]
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key
    assert sa["ledger"] == sb["ledger"]
    assert json.loads((Path(a) / "summary.json").read_text())["final_test_acc"] == json.loads((Path(b) / "summary.json").read_text())["final_test_acc"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *RUN, "--output", str(out)]) == 0
    return out


KILL_STEPS = [16, 32] + random.Random(7).sample(range(1, 64), 3)  # epoch ends and random steps


@pytest.mark.slow
@pytest.mark.parametrize("step", KILL_STEPS)
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, step):
    """SIGKILL at a step, then --resume: records and parameters, momentum and errors equal the uninterrupted run.
    The first case resumes in a process of its own, as a user does (nothing carried over in memory from
    the reference run); the others resume in this process."""
    out = tmp_path / "run"
    killed = saef_cli(["train", *RUN, "--output", str(out)], fault=f"kill-at-step:{step}")
    assert killed.returncode == -9
    assert not (out / "summary.json").exists()
    if step == KILL_STEPS[0]:
        resumed = saef_cli(["train", "--resume", str(out), "--quiet"])
        assert resumed.returncode == 0, resumed.stderr
    else:
        assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_identical(reference, out)


# every other rule and the baseline (top-k 10 %; error averaging is for ef/saef only, which RUN covers)
OTHER_METHODS = [["--method", "ef", "--double-way"], ["--method", "ef21", "--double-way"], ["--method", "ef21", "--single-way"],
                 ["--method", "direct", "--double-way"], ["--method", "sgd", "--compressor", "identity"],
                 # local steps, the last checkpoint (step 25) mid-round: inner SGD and outer Nesterov, inner AdamW
                 ["--local-steps", "3", "--outer-lr", "0.7", "--outer-momentum", "0.5", "--nesterov", "--error-decay", "0.95",
                  "--average-every", "2"],
                 ["--method", "direct", "--local-steps", "4", "--inner-optimizer", "adamw", "--lr", "0.003"]]


@pytest.mark.slow
@pytest.mark.parametrize("method", OTHER_METHODS, ids=lambda m: "-".join(a.strip("-") for a in m))
def test_every_rule_resumes_bit_identically(tmp_path, method):
    """For every rule (and full-precision SGD, and local steps resumed mid-round): SIGKILL mid-epoch (step 27),
    then --resume ends with the records, parameters, every state tensor (e.g. EF21's estimates and server
    model; the workers' iterates and inner moments) and bit counts of an uninterrupted run."""
    run = [a for a in RUN if a not in ("--average-every", "3")]
    run = [a for a in run if a not in ("--compressor", "topk:0.1")] + (["--compressor", "topk:0.1"] if "sgd" not in method else []) + method
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *run, "--output", str(reference)]) == 0
    assert saef_cli(["train", *run, "--output", str(out)], fault="kill-at-step:27").returncode == -9
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_identical(reference, out)


# random draws (rand-k), a compressor with state (PowerSGD's Q, worker and server) killed inside the warm-up,
# stochastic rounding with 16-bit values, and SAEF-Adam (m, v, its step size) killed inside and after its warm-up
SAEF_ADAM = ["--optimizer", "adam", "--lr", "0.003", "--eps", "1e-3", "--compressor", "sign", "--average-every", "3",
             "--warmup-steps", "20"]
COMPRESSOR_RUNS = [(["--compressor", "randk:0.1"], 27), (["--compressor", "powersgd:2", "--warmup-steps", "20"], 10),
                   (["--compressor", "qsgd:4:fp16", "--method", "direct"], 27), (SAEF_ADAM, 10), (SAEF_ADAM, 27)]


@pytest.mark.slow
@pytest.mark.parametrize("extra, step", COMPRESSOR_RUNS, ids=lambda v: "-".join(a.strip("-") for a in v) if isinstance(v, list) else str(v))
def test_random_and_stateful_compressors_resume_bit_identically(tmp_path, extra, step):
    """SIGKILL, then --resume, ends with the records (the phase column included), parameters, every state
    tensor (PowerSGD's Q of the workers and the server; Adam's m, v and step size) and bit counts of an uninterrupted run: the draws
    come from (seed, step, layer, sender), and the compressor's state is checkpointed."""
    run = [a for a in RUN if a not in ("--average-every", "3", "--compressor", "topk:0.1")] + extra
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *run, "--output", str(reference)]) == 0
    assert saef_cli(["train", *run, "--output", str(out)], fault=f"kill-at-step:{step}").returncode == -9
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_identical(reference, out)
    if "adam" in extra:
        assert {"momentum", "second_moment", "step_size", "worker_error"} <= set(final_state(out)["algorithm"]["tensors"])
    if "powersgd:2" in extra:
        assert {"uplink_state", "downlink_state"} <= set(final_state(out)["algorithm"]["tensors"])
        assert [r["phase"] for r in records(out)] == ["warmup", "warmup+compressed", "compressed", "compressed"]  # 16 steps an epoch


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(reference, tmp_path):
    """Killed while writing the step-15 checkpoint: the torn file is never listed, step 10 loads, and the
    resumed run still ends bit-identical."""
    out = tmp_path / "run"
    killed = saef_cli(["train", *RUN, "--output", str(out)], fault="kill-in-checkpoint:15")
    assert killed.returncode == -9
    assert [e["step"] for e in json.loads((out / "checkpoints" / "manifest.json").read_text())][-1] == 10
    assert checkpoint.load_latest(out / "checkpoints")["loop"]["step"] == 10
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_identical(reference, out)


def _newest_file(run_dir):
    entry = json.loads((Path(run_dir) / "checkpoints" / "manifest.json").read_text())[-1]
    return Path(run_dir) / "checkpoints" / next(iter(entry["files"]))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back(reference, tmp_path, damage):
    """A truncated or corrupted newest checkpoint fails its checksum; resume warns and uses the previous one,
    and the run still ends bit-identical."""
    out = tmp_path / "run"
    assert saef_cli(["train", *RUN, "--output", str(out)], fault="kill-at-step:27").returncode == -9
    path = _newest_file(out)
    data = bytearray(path.read_bytes())
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    resumed = saef_cli(["train", "--resume", str(out), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    assert "checksum" in resumed.stderr
    assert_identical(reference, out)


@pytest.mark.slow
def test_every_checkpoint_damaged_is_refused(tmp_path):
    """With no usable checkpoint, resume exits 2 naming the damaged files, and changes nothing."""
    out = tmp_path / "run"
    assert saef_cli(["train", *RUN, "--output", str(out)], fault="kill-at-step:12").returncode == -9
    for path in (out / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:50])
    before = (out / "metrics.jsonl").read_bytes()
    resumed = saef_cli(["train", "--resume", str(out), "--quiet"])
    assert resumed.returncode == 2 and "no usable checkpoint" in resumed.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_checkpoint_from_another_version_is_refused(tmp_path):
    """A checkpoint whose format version differs is refused with exit 2."""
    folder = tmp_path / "checkpoints"
    checkpoint.save(folder, 3, {"x": torch.zeros(2)})
    path = next(folder.glob("*.pt"))
    saved = torch.load(path, weights_only=True)
    saved["format_version"] = 999
    torch.save(saved, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib

    manifest[-1]["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="format 999"):
        checkpoint.load_latest(folder)


def test_resume_with_other_compressor_needs_reset_errors(tmp_path, capsys):
    """Changing the compressor on resume is refused (exit 2) unless --reset-errors, which is logged."""
    out = tmp_path / "run"
    assert main(["train", *RUN, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--compressor", "sign"]) == 2
    err = capsys.readouterr().err
    assert "compressor" in err and "--reset-errors" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", str(out), "--epochs", "2", "--compressor", "sign", "--workers", "2", "--reset-errors", "--quiet"]) == 0
    event = json.loads((out / "events.jsonl").read_text().splitlines()[-1])
    assert event["reset_errors"] is True and event["changed"]["compressor"] == ["topk:0.1", "sign"]
    assert len(records(out)) == 2


def test_resume_into_adam_after_its_warmup_is_refused_and_old_csv_headers_are_rebuilt(tmp_path, capsys):
    """A reset from a momentum-SGD run into optimizer adam past its warm-up exits 2 naming why (v would stay
    0); a run whose metrics.csv has an older header (fewer columns) is resumed with the header rebuilt from
    metrics.jsonl, so the appended rows line up with it."""
    out = tmp_path / "run"
    assert main(["train", *RUN, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--optimizer", "adam", "--lr", "0.001", "--reset-errors"]) == 2
    assert "v is updated only in full precision" in capsys.readouterr().err
    csv_path = out / "metrics.csv"
    lines = csv_path.read_text().splitlines()
    old_columns = [c for c in lines[0].split(",") if c not in ("test_bpb", "test_bpb_aux")]
    kept = [line.split(",") for line in lines[1:]]
    index = [lines[0].split(",").index(c) for c in old_columns]
    csv_path.write_text("\n".join([",".join(old_columns)] + [",".join(row[i] for i in index) for row in kept]) + "\n")
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    with open(csv_path) as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(METRIC_COLUMNS) and len(table) == 2
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in records(out)]


def test_resume_cannot_change_the_model(tmp_path, capsys):
    """Changing the model (or data) on resume is refused: that is another run."""
    out = tmp_path / "run"
    assert main(["train", *RUN, "--epochs", "1", "--output", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--model", "cnn1d", "--reset-errors"]) == 2
    assert "model cannot change" in capsys.readouterr().err


def test_nan_in_data_never_reaches_state():
    """A NaN in the inputs raises NonFiniteStep and leaves parameters, momentum and errors untouched."""
    torch.manual_seed(0)
    sim = saef.Simulator(nn.Sequential(nn.Linear(4, 3)), workers=2, compressor="sign", momentum=0.9)
    inputs, targets = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    sim.step(inputs, targets, lr=0.1)
    before = {k: v.clone() for k, v in sim.state.state_dict().items() if isinstance(v, torch.Tensor)}
    x = sim.x.clone()
    inputs[3, 1] = float("nan")
    with pytest.raises(NonFiniteStep):
        sim.step(inputs, targets, lr=0.1)
    assert torch.equal(sim.x, x)
    for key, value in before.items():
        assert torch.equal(getattr(sim.state, key), value)


@pytest.mark.slow
def test_diverging_run_stops_after_consecutive_skips(tmp_path):
    """An lr so large that the loss turns NaN: steps are skipped, then the run stops (exit 1) with a clear
    message after --max-nonfinite-skips in a row, and no summary marks it complete."""
    out = tmp_path / "run"
    run = [a for a in RUN if a not in ("--average-every", "3")]  # sgd has no error to average
    result = saef_cli(["train", *run, "--compressor", "identity", "--method", "sgd", "--lr", "1e30", "--max-nonfinite-skips", "2", "--output", str(out)])
    assert result.returncode == 1
    assert "3 step(s) in a row had a NaN or Inf" in result.stderr
    assert not (out / "summary.json").exists()


def test_disk_full_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    """A checkpoint write that fails with ENOSPC leaves no partial file, and the previous checkpoint loads."""
    folder = tmp_path / "checkpoints"
    checkpoint.save(folder, 1, {"x": torch.ones(3)})
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("saef.files.os.fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(folder, 2, {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "step-00000001.rank0.pt"]
    assert torch.equal(checkpoint.load_latest(folder)["x"], torch.ones(3))


@pytest.mark.parametrize("written", [0, 2])
def test_disk_full_exits_nonzero_with_message(tmp_path, monkeypatch, capsys, written):
    """saef train on a full disk exits 1 with a message, without a summary that marks the run complete; the
    message names the newest checkpoint left (step 10 after two) or says that none was written yet."""
    real = saef.files.write_atomically
    writes = []

    def failing(path, data):
        if "checkpoints" in str(path) and str(path).endswith(".pt"):
            writes.append(path)
            if len(writes) > written:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr("saef.app.checkpoint.write_atomically", failing)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1, err
    if written:
        assert f"the newest complete checkpoint (step 10) is intact (resume with --resume {out}" in err, err
    else:
        assert "no checkpoint was written yet" in err and "intact" not in err, err
    assert not (out / "summary.json").exists()


def test_empty_model_is_refused():
    """A model without trainable parameters is refused at construction."""
    with pytest.raises(ValueError, match="no trainable parameters"):
        saef.Simulator(nn.Sequential(), workers=2)


def _dist(argv, out, fault=None, world=2):
    sys.path.insert(0, str(Path(__file__).parent))
    from _procs import launch, wait_all

    extra = {"SAEF_FAULT": fault} if fault else {"SAEF_FAULT": ""}
    procs = launch([FAULTS, "train", *argv, "--output", str(out)], world, extra_env=extra,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    codes = wait_all(procs, timeout=180)
    return codes, [p.stderr.read() for p in procs]


DIST = ["--backend", "dist", *RUN, "--timeout", "20"]


@pytest.fixture(scope="module")
def dist_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-ref") / "run"
    codes, errs = _dist(DIST, out)
    assert codes == [0, 0], errs
    return out


def _assert_ranks_identical(a, b, world=2):
    assert records(a) == records(b)
    for rank in range(world):
        sa = checkpoint.load_latest(Path(a) / "checkpoints", rank=rank, world=world)["trainer"]
        sb = checkpoint.load_latest(Path(b) / "checkpoints", rank=rank, world=world)["trainer"]
        assert torch.equal(sa["x"], sb["x"])
        for key, tensor in sa["algorithm"]["tensors"].items():
            assert torch.equal(tensor, sb["algorithm"]["tensors"][key]), (rank, key)


@pytest.mark.slow
def test_distributed_sigkill_then_resume_is_bit_identical(dist_reference, tmp_path):
    """2 gloo processes: rank 1 is SIGKILLed mid-epoch, rank 0 stops with an error; --resume on both ranks
    ends bit-identical (records, and each rank's parameters, momentum, worker and server error)."""
    out = tmp_path / "run"
    codes, errs = _dist(DIST, out, fault="kill-at-step:21@1")
    assert codes[1] == -9 and codes[0] not in (0, None), codes
    codes, errs = _dist(["--resume", str(out), "--quiet"], out)
    assert codes == [0, 0], errs
    _assert_ranks_identical(dist_reference, out)


@pytest.mark.slow
def test_distributed_ef21_resumes_bit_identically(tmp_path):
    """EF21 double-way on 2 gloo processes keeps the true model and g with each layer's owner: rank 1 is
    SIGKILLed mid-epoch, and --resume on both ranks ends bit-identical to an uninterrupted run."""
    run = [a for a in DIST if a not in ("--average-every", "3")] + ["--method", "ef21"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    codes, errs = _dist(run, reference)
    assert codes == [0, 0], errs
    codes, errs = _dist(run, out, fault="kill-at-step:21@1")
    assert codes[1] == -9 and codes[0] not in (0, None), codes
    codes, errs = _dist(["--resume", str(out), "--quiet"], out)
    assert codes == [0, 0], errs
    _assert_ranks_identical(reference, out)
    state = checkpoint.load_latest(out / "checkpoints", rank=0, world=2)["trainer"]["algorithm"]["tensors"]
    assert {"worker_estimate", "server_estimate", "server_model"} <= set(state)


def _dist_in(cwds, argv, extra_env=None):
    """Ranks of ``_faults.py train argv``, rank r in folder ``cwds[r]`` (hosts that share no disk, when argv's
    paths are relative); their exit codes and stderr."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _procs import free_port, rank_env, wait_all

    port = free_port()
    procs = [subprocess.Popen([sys.executable, FAULTS, "train", *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=rank_env(rank, len(cwds), port, SAEF_FAULT="", **(extra_env or {})))
             for rank, cwd in enumerate(cwds)]
    codes = wait_all(procs, timeout=180)
    return codes, [p.stderr.read() for p in procs]


def _last_event(out):
    return json.loads((Path(out) / "events.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_ranks_resume_the_newest_step_every_rank_can_load(dist_reference, tmp_path):
    """One byte flipped in rank 1's newest checkpoint (step 64): rank 0 could load step 64, rank 1 only 60.
    They agree on step 60 (one exchange, before loading), both resume it, and the run ends bit-identical
    to the uninterrupted one. (Before, rank 0 resumed 64 and rank 1 60: mismatched state, then a hang.)"""
    out = tmp_path / "run"
    shutil.copytree(dist_reference, out)
    newest = out / "checkpoints" / "step-00000064.rank1.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    codes, errs = _dist(["--resume", str(out), "--quiet"], out)
    assert codes == [0, 0], errs
    assert _last_event(out)["step"] == 60
    assert "step-00000064.rank1.pt does not match its checksum" in errs[1] and "resuming from step 60" in errs[1], errs[1]
    assert "another rank cannot load them; resuming from step 60" in errs[0], errs[0]
    _assert_ranks_identical(dist_reference, out)


@pytest.mark.slow
def test_torchrun_restart_before_the_first_checkpoint_starts_again(dist_reference, tmp_path):
    """torchrun --max-restarts 1, rank 1 killed at step 3, before the first checkpoint (step 5): the restarted
    launch finds the run directory it made (its launchers are recorded there), starts the run again from
    the beginning, and ends equal to the uninterrupted run. (Before: "already exists and is not empty" on
    every restart until they were spent.)"""
    from _procs import child_env, free_port

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), FAULTS, "train", *DIST,
                             "--output", str(out)], env=child_env(SAEF_FAULT="kill-at-step:3@1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _last_event(out)["from_scratch"] is True
    _assert_ranks_identical(dist_reference, out)


@pytest.mark.slow
def test_a_rank_that_cannot_see_the_run_directory_stops_the_job(tmp_path):
    """Two 'hosts' without a shared disk (a relative --output in different folders): rank 0 has the run, rank 1
    only its own checkpoint files. When a launcher restarts the job, rank 0 would resume and rank 1 start from
    step 0; instead every rank stops (exit 2) with a message naming the shared-storage requirement."""
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    for host in hosts:
        host.mkdir()
    argv = [*DIST, "--epochs", "1", "--output", "run"]
    codes, errs = _dist_in(hosts, argv)
    assert codes == [0, 0], errs
    codes, errs = _dist_in(hosts, argv, {"TORCHELASTIC_RESTART_COUNT": "1"})  # as torchrun restarts a job
    assert codes == [2, 2], errs
    for err in errs:
        assert "rank 1 finds no checkpoint in run/checkpoints while rank 0 does" in err and "storage that every host shares" in err, err
    codes, errs = _dist_in(hosts, ["--resume", "run", "--quiet"])  # and so does --resume on both
    assert codes[1] == 2 and "storage every host shares" in errs[1], errs[1]


@pytest.mark.slow
def test_ranks_that_loaded_different_data_stop_at_the_start(tmp_path):
    """Each rank reads MNIST-1D from its own cache (--data-dir on each host's disk); rank 1's has two labels
    swapped. The ranks compare the data they loaded before training, and stop (exit 2) naming it."""
    from saef.zoo.datasets import load_dataset

    hosts = [tmp_path / "host0", tmp_path / "host1"]
    load_dataset("mnist1d", hosts[0] / "data", size=100, seed=0)
    (hosts[1] / "data").mkdir(parents=True)
    with np.load(hosts[0] / "data" / "mnist1d-100-0.npz") as cached:
        arrays = {key: cached[key].copy() for key in cached.files}
    arrays["y"][[0, 1]] = arrays["y"][[1, 0]] if arrays["y"][0] != arrays["y"][1] else (arrays["y"][[0, 1]] + 1) % 10
    np.savez(hosts[1] / "data" / "mnist1d-100-0.npz", **arrays)
    argv = ["--backend", "dist", "--dataset", "mnist1d", "--dataset-size", "100", "--data-dir", "data", "--model", "mlp",
            "--batch-size", "16", "--epochs", "1", "--quiet", "--timeout", "20", "--output", "run"]
    codes, errs = _dist_in(hosts, argv)
    assert codes == [2, 2], errs
    assert "the ranks disagree on data loaded (sha256)" in errs[0], errs[0]


@pytest.mark.slow
def test_a_change_of_workers_with_reset_errors_is_logged(dist_reference, tmp_path):
    """A two-rank run resumed as one rank (K 2 -> 1, the job's size) with --reset-errors: the change of K is
    recorded in events.jsonl like any other; without --reset-errors it is refused."""
    out = tmp_path / "run"
    shutil.copytree(dist_reference, out)
    codes, errs = _dist(["--resume", str(out), "--epochs", "5", "--quiet"], out, world=1)
    assert codes == [2] and "written by 2 processes, this run has 1 (resuming with another number of processes needs --reset-errors)" in errs[0], errs
    codes, errs = _dist(["--resume", str(out), "--epochs", "5", "--reset-errors", "--quiet"], out, world=1)
    assert codes == [0], errs
    event = _last_event(out)
    assert event["reset_errors"] is True and event["changed"]["workers"] == [2, 1] and event["changed"]["epochs"] == [4, 5]


@pytest.mark.slow
def test_torchrun_restart_resumes_automatically(dist_reference, tmp_path):
    """Under torchrun --max-restarts 1, a rank killed mid-run is restarted with the others, they resume from
    the last complete checkpoint by themselves, and the run ends bit-identical."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), SAEF_FAULT="kill-at-step:37@1")
    sys.path.insert(0, str(Path(__file__).parent))
    from _procs import free_port

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), FAULTS, "train", *DIST,
                             "--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "events.jsonl").read_text().splitlines()[-1])["event"] == "resume"
    _assert_ranks_identical(dist_reference, out)
