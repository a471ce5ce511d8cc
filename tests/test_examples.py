"""The examples run, in seconds: the plain loop under torchrun, and those that plug saef into other stacks --
Hugging Face's Trainer under torchrun and PyTorch Lightning with 2 CPU processes, each with saef's DDP
communication hook sending compressed payloads (their bits are printed and checked here), and each with
saef.SAEF as the optimizer behind saef.local_gradients_hook (no warning about DDP; every rank ends with the
same x, and rounds as set). Skipped, saying why, where the library is not installed (`pip install -e .[test]`
installs both)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from _procs import child_env, free_port

EXAMPLES = Path(__file__).parent.parent / "examples"


def _sent_up(output: str):
    return [float(v) for v in re.findall(r"sent ([0-9.]+) kB per worker up", output)]


def _optimizer_example(argv, rounds, cwd):
    """Run an example with saef.SAEF on 2 processes: each rank printed its bits, rounds and x's digest."""
    result = subprocess.run(argv, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    said = re.findall(r"sent ([0-9.]+) kB per worker up in (\d+) rounds; x ([0-9a-f]{16})", output)
    assert len(said) == 2 and all(float(kb) > 0 and int(r) == rounds for kb, r, _ in said), output[-2000:]
    assert said[0][2] == said[1][2]  # every rank holds the same model x
    assert "belong to a DistributedDataParallel" not in output


@pytest.mark.slow
def test_hugging_face_trainer_with_the_hook(tmp_path):
    pytest.importorskip("transformers", reason="the Hugging Face example needs transformers (pip install -e .[test])")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install -e .[test])")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                             "--master_port", str(free_port()), str(EXAMPLES / "hf_trainer_hook.py")], cwd=tmp_path,
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sent = _sent_up(result.stdout)
    assert len(sent) == 2 and all(v > 0 for v in sent), result.stdout[-2000:]


@pytest.mark.slow
def test_lightning_with_the_hook(tmp_path):
    pytest.importorskip("lightning", reason="the Lightning example needs lightning (pip install -e .[test])")
    result = subprocess.run([sys.executable, str(EXAMPLES / "lightning_ddp_hook.py")], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sent = _sent_up(result.stdout + result.stderr)
    assert len(sent) == 2 and all(v > 0 for v in sent), (result.stdout + result.stderr)[-2000:]


@pytest.mark.slow
def test_hugging_face_trainer_with_the_optimizer(tmp_path):
    """saef.SAEF with 4 local AdamW steps a round in the Trainer: 8 steps are 2 rounds."""
    pytest.importorskip("transformers", reason="the Hugging Face example needs transformers (pip install -e .[test])")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install -e .[test])")
    _optimizer_example([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), str(EXAMPLES / "hf_trainer_optimizer.py")], rounds=2, cwd=tmp_path)


@pytest.mark.slow
def test_lightning_with_the_optimizer(tmp_path):
    pytest.importorskip("lightning", reason="the Lightning example needs lightning (pip install -e .[test])")
    _optimizer_example([sys.executable, str(EXAMPLES / "lightning_optimizer.py")], rounds=8, cwd=tmp_path)


@pytest.mark.slow
def test_own_loop_under_torchrun(tmp_path):
    """examples/own_loop_torchrun.py, 2 ranks, 1 epoch of MNIST-1D: it trains (above chance) and sends packed signs."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                             "--master_port", str(free_port()), str(EXAMPLES / "own_loop_torchrun.py"), "--epochs", "1",
                             "--data-dir", str(tmp_path / "data")], cwd=tmp_path, env=child_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    said = re.findall(r"epoch 1: test accuracy ([0-9.]+)%  \(([0-9.]+) MB sent per worker so far\)", result.stdout)
    assert len(said) == 1 and float(said[0][0]) > 20 and float(said[0][1]) > 0, result.stdout[-2000:]
