"""Runs that stop and start again, and their directory: a diverging run keeps its healthy checkpoint, a
run killed before its first checkpoint starts again, what a resume may change (and is logged), checkpoints
of the wrong structure, one writer per run directory, and `saef reproduce` stopping its children. Every
process these tests start is bounded in time. (Checkpoints themselves: test_checkpoint.py.)"""

import json
import os
import subprocess
import sys

import pytest

import saef
from saef.app import checkpoint
from saef.app.cli import main
from saef.app.config import TrainConfig
from saef.app.loop import train
from saef.core import NonFiniteStep

from _procs import FAULTS, child_env, wait_for

FAST = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--quiet"]


def test_a_diverging_run_keeps_its_healthy_checkpoint(tmp_path, monkeypatch):
    """From step 10 on every step is non-finite: while the run skips steps, no checkpoint replaces (or,
    through --keep-checkpoints 1, evicts) the one of step 10; the stop names it; and resuming from it with
    the trouble gone finishes the run."""
    config = TrainConfig(dataset="synthetic", model="mlp", batch_size=32, epochs=2, checkpoint_every=1,
                         keep_checkpoints=1, max_nonfinite_skips=8, output=str(tmp_path / "run"))
    real_step = saef.Simulator.step

    def diverging(self, inputs, targets, lr):
        if self.state.step >= 10:
            raise NonFiniteStep("loss nan (injected)")
        return real_step(self, inputs, targets, lr)

    monkeypatch.setattr(saef.Simulator, "step", diverging)
    with pytest.raises(FloatingPointError, match=r"the newest checkpoint \(step 10\) is from before them"):
        train(config, progress=False, log=lambda m: None)
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest.json").read_text())
    assert [entry["step"] for entry in manifest] == [10]
    monkeypatch.setattr(saef.Simulator, "step", real_step)
    summary = train(config, progress=False, log=lambda m: None, resume=True)
    assert summary["steps"] == 32 and summary["skipped_steps"] == 0


def cli(args, fault=None):
    env = child_env()
    env.pop("SAEF_FAULT", None)
    if fault:
        env["SAEF_FAULT"] = fault
    return subprocess.run([sys.executable, FAULTS, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_killed_before_its_first_checkpoint_resume_starts_again(tmp_path):
    """A run killed before its first checkpoint is not a dead end: --resume starts it again from the
    beginning in the same directory, says so, and ends with the records of an uninterrupted run."""
    run = [*FAST, "--epochs", "2"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *run, "--output", str(reference)]) == 0  # (in this process: it is only the reference)
    assert cli(["train", *run, "--output", str(out)], fault="kill-at-step:3").returncode == -9
    resumed = cli(["train", "--resume", str(out), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    assert "stopped before its first checkpoint; starting it again from the beginning" in resumed.stdout

    def rows(path):
        return [{k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "wall_time")}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert rows(out) == rows(reference)
    event = json.loads((out / "events.jsonl").read_text().splitlines()[-1])
    assert event["from_scratch"] is True


def test_resume_refuses_fewer_epochs_and_logs_every_change(tmp_path, capsys):
    """Resuming with fewer --epochs than already trained is refused (a summary would contradict the rows);
    an accepted change -- even to 'never' -- is logged in events.jsonl; the checkpoint's identity includes
    the dataset size."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "2", "--average-every", "5", "--output", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "1"]) == 2
    assert "already trained 2 epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--epochs", "3", "--average-every", "never", "--quiet"]) == 0
    event = json.loads((out / "events.jsonl").read_text().splitlines()[-1])
    assert event["changed"]["average_every"] == [5, None]
    state = checkpoint.load_latest(out / "checkpoints")
    assert "dataset_size" in state["config"]


def test_resume_takes_only_what_it_can_mean(tmp_path, capsys, monkeypatch):
    """--resume '' and --resume with --output elsewhere are refused with exit 2 (before, the first started a new
    run and the second ignored --output); values that mean what the run already has (synthetic's default size
    by its number, topk:0.010) are no change: accepted, not logged, not refused as changes of fixed keys."""
    monkeypatch.chdir(tmp_path)  # (a new default run would be made here)
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "", "--epochs", "2"]) == 2
    assert "--resume needs the run directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--output", str(tmp_path / "elsewhere"), "--epochs", "2"]) == 2
    assert "a resumed run continues in its own directory; leave --output out" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()
    assert main(["train", "--resume", str(out), "--output", str(out), "--epochs", "2", "--dataset-size", "512",
                 "--compressor", "topk:0.010"]) == 0, capsys.readouterr().err
    event = json.loads((out / "events.jsonl").read_text().splitlines()[-1])
    assert event["changed"] == {"epochs": [1, 2]}
    assert main(["train", "--resume", str(out), "--epochs", "3", "--dataset-size", "500"]) == 2  # a real change still is
    assert "dataset_size" in capsys.readouterr().err


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """Without --output a run's directory is named after the run and the second it started; a second run of
    the same name in the same second gets its own (name-2) instead of exiting 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("saef.app.rundir.time.strftime", lambda fmt: "20261207-120000")
    assert main(["train", *FAST, "--epochs", "1"]) == 0
    assert main(["train", *FAST, "--epochs", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(names) == 2 and names[1] == names[0] + "-2", names
    assert all((tmp_path / "runs" / name / "summary.json").exists() for name in names)


def test_dist_takes_its_workers_from_the_job(monkeypatch, capsys):
    """Under a launcher, --backend dist's K is the job's size: the default --workers is not checked against
    the batch (--batch-size 30 with 3 processes is fine), a --workers that says otherwise is refused, and
    without a launcher the run exits 2 naming torchrun."""
    from saef.app.config import ConfigError, load_config

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert load_config(None, {"backend": "dist", "batch_size": 30}).workers == 3
    with pytest.raises(ConfigError, match="this torch.distributed job has 3 processes .* leave --workers out"):
        load_config(None, {"backend": "dist", "workers": 4, "batch_size": 30})
    assert load_config(None, {"batch_size": 32}).workers == 4  # (the simulator: K as asked)
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", *FAST, "--backend", "dist", "--epochs", "1", "--output", "unused"]) == 2
    err = capsys.readouterr().err
    assert "needs a torch.distributed launcher" in err and "torchrun" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_run_directory_has_one_writer(tmp_path):
    """While a run trains, a second `saef train --resume` of its directory is refused (exit 2, naming the
    holder's pid) and writes nothing; after the holder is SIGKILLed the lock is gone with it (no stale
    lock) and the resume works."""
    out = tmp_path / "run"
    env = child_env()
    holder = subprocess.Popen([sys.executable, "-m", "saef", "train", *FAST, "--dataset-size", "4096", "--epochs", "50",
                               "--checkpoint-every", "10", "--output", str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (out / "checkpoints" / "manifest.json").exists())
        rows_before = (out / "metrics.jsonl").read_text()
        second = subprocess.run([sys.executable, "-m", "saef", "train", "--resume", str(out), "--quiet"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is being written by process {holder.pid}" in second.stderr
        assert (out / "metrics.jsonl").read_text().startswith(rows_before) and not (out / "events.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    resumed = subprocess.run([sys.executable, "-m", "saef", "train", "--resume", str(out), "--epochs", "1", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode in (0, 2), resumed.stderr  # 2 only if the holder finished epoch 1 (then --epochs 1 is too few)
    assert "is being written" not in resumed.stderr


@pytest.mark.slow
def test_reproduce_stops_its_children_on_sigterm(tmp_path):
    """SIGTERM to `saef reproduce` reaches its `saef train` children, which it waits for: none is left
    running after it exits."""
    env = child_env()
    runs = tmp_path / "runs"
    parent = subprocess.Popen([sys.executable, "-m", "saef", "reproduce", "fig3", "--seeds", "1", "--runs", str(runs),
                               "--out", str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        locks = lambda: list(runs.rglob(".lock"))  # noqa: E731 -- a child that has claimed its run directory
        assert wait_for(lambda: locks() and locks()[0].read_text().strip())
        child = int(locks()[0].read_text())
        parent.send_signal(15)
        assert parent.wait(timeout=90) == 128 + 15
    finally:
        if parent.poll() is None:
            parent.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saef: error: ") and needle in err, err


def test_checkpoints_of_the_wrong_structure_are_refused(tmp_path, capsys):
    """A checkpoint that passes its checksum but holds the wrong structure (an RNG state of the wrong size),
    and a manifest that is JSON but not a list of entries: --resume exits 2 with one line naming the
    checkpoint folder, and changes nothing."""
    import hashlib
    import io

    import torch

    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--output", str(out)]) == 0
    folder = out / "checkpoints"
    manifest = json.loads((folder / "manifest.json").read_text())
    name = next(iter(manifest[-1]["files"]))
    saved = torch.load(folder / name, weights_only=True)
    saved["state"]["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    (folder / name).write_bytes(buffer.getvalue())
    manifest[-1]["files"][name] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    rows = (out / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 2
    one_line_error(capsys, "does not hold this run's state")
    assert (out / "metrics.jsonl").read_text() == rows
    (folder / "manifest.json").write_text("[1, 2]")
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 2
    one_line_error(capsys, "is not a valid checkpoint manifest")
