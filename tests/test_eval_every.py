"""``--eval-every N``: rows every N steps within an epoch, to steps.jsonl and steps.csv. Each measures the model
at its step (checked against x read from that step's checkpoint and evaluated here by hand), training is the
same as without them, and a resumed run keeps only the rows its checkpoint covers."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saef.app.cli import main
from saef.app.plots import read_run
from saef.zoo.datasets.registry import load_dataset
from saef.zoo.models import build_model

# synthetic: 512 samples, batch 32 -> 16 steps per epoch, 2 epochs
RUN = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--epochs", "2", "--compressor", "topk:0.1",
       "--checkpoint-every", "5", "--keep-checkpoints", "20", "--quiet"]
TIMES = ("epoch_time", "wall_time")
FAULTS = str(Path(__file__).parent / "_faults.py")
SRC = str(Path(__file__).parent.parent / "src")


def _lines(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in Path(path).read_text().splitlines()]


def _at_checkpoint(run_dir, step, data, model):
    """Test loss and accuracy of x as saved at ``step``, computed here from the checkpoint file."""
    saved = torch.load(Path(run_dir) / "checkpoints" / f"step-{step:08d}.rank0.pt", weights_only=False)["state"]
    torch.nn.utils.vector_to_parameters(saved["trainer"]["x"], model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(data.test.inputs)
    return F.cross_entropy(out, data.test.targets).item(), (out.argmax(1) == data.test.targets).float().mean().item()


def test_rows_every_n_steps_measure_the_model_at_their_step_and_change_nothing(tmp_path):
    with_rows, without = tmp_path / "with", tmp_path / "without"
    assert main(["train", *RUN, "--eval-every", "5", "--output", str(with_rows)]) == 0
    assert main(["train", *RUN, "--output", str(without)]) == 0
    assert _lines(with_rows / "metrics.jsonl") == _lines(without / "metrics.jsonl")  # the epochs' rows: training unchanged
    assert not (without / "steps.jsonl").exists()
    rows = _lines(with_rows / "steps.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]  # (16 and 32 end epochs: their rows are in metrics)
    assert [r["epoch"] for r in rows] == [s / 16 for s in (5, 10, 15, 20, 25, 30)]
    data = load_dataset("synthetic", tmp_path / "data", seed=0)
    model = build_model("mlp", data)
    for row in rows:
        loss, acc = _at_checkpoint(with_rows, row["step"], data, model)
        assert row["test_loss"] == pytest.approx(loss, rel=1e-6) and row["test_acc"] == acc, row["step"]
        assert row["train_loss"] > 0 and row["bits_up"] > 0
    assert rows[0]["bits_up"] * 2 == rows[1]["bits_up"]  # (top-k's payload is the same every step)
    with open(with_rows / "steps.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in table] == [5, 10, 15, 20, 25, 30] and float(table[2]["test_loss"]) == rows[2]["test_loss"]
    _, merged = read_run(with_rows)  # what the plots draw: every row, by step
    assert [r["step"] for r in merged] == [5, 10, 15, 16, 20, 25, 30, 32]


@pytest.mark.slow
def test_a_resumed_run_keeps_only_the_rows_its_checkpoint_covers(tmp_path):
    """Killed at step 13 (rows at 4, 8, 12 written, the newest checkpoint at 10; then a row cut short appended):
    the resumed run drops the row of step 12 and the cut one and writes step 12's again, so steps.jsonl ends
    with each row once, equal to the uninterrupted run's."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *RUN, "--eval-every", "4", "--output", str(reference)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", SAEF_FAULT="kill-at-step:13",
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run([sys.executable, FAULTS, "train", *RUN, "--eval-every", "4", "--output", str(out)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in _lines(out / "steps.jsonl")] == [4, 8, 12]
    with open(out / "steps.jsonl", "a") as handle:  # and a row cut short, as a crash or a full disk leaves it
        handle.write('{"epoch": 0.875, "step": 14, "rounds"')
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert _lines(out / "steps.jsonl") == _lines(reference / "steps.jsonl")
    assert [r["step"] for r in _lines(out / "steps.jsonl")] == [4, 8, 12, 20, 24, 28]
    assert len((out / "steps.csv").read_text().splitlines()) == 1 + 6
    assert _lines(out / "metrics.jsonl") == _lines(reference / "metrics.jsonl")
