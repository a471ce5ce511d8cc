"""Reliability, round two: ranks that disagree, waits that must be bounded, integers out of range, a
diverging run keeping its healthy checkpoint, a run killed before its first checkpoint, and changes on
resume. Each test states the principle it checks; every process it starts is bounded in time."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import saef
from saef.app import checkpoint
from saef.app.cli import main
from saef.app.config import TrainConfig
from saef.app.loop import train
from saef.core import NonFiniteStep

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _procs import FAULTS, child_env, free_port, rank_env, wait_all, wait_for  # noqa: E402

FAST = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--quiet"]


def ranks_with(per_rank_flags, out, timeout=60):
    """Start one `saef train --backend dist` per entry of ``per_rank_flags`` (its own extra flags)."""
    port, world = free_port(), len(per_rank_flags)
    procs = [subprocess.Popen([sys.executable, "-m", "saef", "train", "--backend", "dist", *FAST, "--epochs", "1",
                               "--timeout", "20", "--output", str(out), *flags], env=rank_env(r, world, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r, flags in enumerate(per_rank_flags)]
    codes = wait_all(procs, timeout)
    return codes, [p.stderr.read() for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("flags,key", [(["--seed", "1"], "seed"), (["--compressor", "sign"], "compressor")])
def test_ranks_that_disagree_all_stop_with_one_line(tmp_path, flags, key):
    """Two ranks started with different settings (a seed: would run silently; a compressor: would abort
    inside gloo) both stop before training, exit 2, and say in one line which key differs on which ranks."""
    codes, errs = ranks_with([[], flags], tmp_path / "run")
    assert codes == [2, 2], errs
    for err in errs:
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"saef: error: the ranks disagree on {key}: rank 0 has") and "rank 1 has" in last, err


def test_timeout_must_be_finite(capsys):
    """--timeout bounds every wait, so it must be finite: inf is refused with one line naming the key."""
    assert main(["train", *FAST, "--timeout", "inf"]) == 2
    assert "timeout = inf is not allowed" in capsys.readouterr().err


class SilentServer:
    """Something that is not a saef rank on the rendezvous port: it accepts connections and never answers."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        for c in self.connections:
            c.close()
        self.socket.close()


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["silent server", "nobody"])
def test_rendezvous_is_bounded_by_the_timeout(tmp_path, peer):
    """A rank whose rendezvous finds a server that never answers, or no rank 0 at all, stops within
    --timeout (3 s here, plus start-up) with exit 1 and a line saying the rendezvous did not complete."""
    server = SilentServer() if peer == "silent server" else None
    port = server.port if server else free_port()
    try:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "saef", "train", "--backend", "dist", *FAST, "--epochs", "1",
                                 "--timeout", "3", "--output", str(tmp_path / "run")], env=rank_env(1, 2, port),
                                capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if server:
            server.close()
    assert result.returncode == 1, result.stderr
    assert "rank 1: the rendezvous at 127.0.0.1" in result.stderr and "within --timeout 3 s" in result.stderr
    assert elapsed < 3 + 12, elapsed  # start-up (imports, data) plus the timeout


@pytest.mark.parametrize("flags,key", [
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**70)], "seed"),
    (["--workers", str(2**20)], "workers"),
    (["--keep-checkpoints", str(10**12)], "keep_checkpoints"),
    (["--epochs", str(2**40)], "epochs"),
    (["--lr-milestones", f"5,{2**40}"], "lr_milestones"),
    (["--average-every", str(2**40)], "average_every"),
    (["--dataset-size", "0"], "dataset_size"),
])
def test_integers_out_of_range_name_their_key(tmp_path, capsys, flags, key):
    """Every integer key has a range: a value outside it stops the command with exit 2 and one line naming
    the key (not an overflow deep inside numpy or torch), before anything is written."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"saef: error: {key} = "), err
    assert not out.exists()


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


def test_unreadable_config_files_get_one_line(tmp_path, capsys):
    """A TOML file that is not UTF-8, or is a directory: exit 2 and one line naming the file."""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"lr = 0.1\n\xff\xfe = 1\n")
    assert main(["train", *FAST, "--config", str(bad)]) == 2
    one_line_error(capsys, "bad.toml is not valid TOML")
    (tmp_path / "dir.toml").mkdir()
    assert main(["train", *FAST, "--config", str(tmp_path / "dir.toml")]) == 2
    one_line_error(capsys, "dir.toml cannot be read")


def test_resume_of_a_file_and_plot_into_a_directory(tmp_path, capsys):
    """--resume of a file and `saef plot -o` a directory: exit 2 and one line saying what is wrong."""
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    assert main(["train", "--resume", str(afile)]) == 2
    one_line_error(capsys, "is not a directory")
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["plot", str(out), "-o", str(tmp_path)]) == 2
    one_line_error(capsys, "is a directory")


@pytest.mark.parametrize("dataset,size", [("synthetic", 10**8), ("mnist1d", 10**6)])
def test_dataset_size_beyond_what_is_generated(tmp_path, capsys, dataset, size):
    """A --dataset-size the generator cannot make in reasonable time and memory is refused at once (it used
    to run for ever), naming the limit; no run directory is made."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", dataset, "--model", "mlp", "--quiet", "--dataset-size", str(size),
                 "--data-dir", str(tmp_path / "data"), "--output", str(out)]) == 2
    one_line_error(capsys, f"dataset_size = {size} is not allowed: {dataset} generates at most")
    assert not out.exists()


def make_cache(tmp_path, damage):
    """An MNIST-1D cache of 100 samples under tmp_path/data, damaged as asked."""
    import numpy as np

    from saef.zoo.datasets.mnist1d import _generate_mnist1d

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "mnist1d-100-0.npz"
    arrays = _generate_mnist1d(100, 0)
    if damage == "labels":
        arrays["y"][3] = 12
    np.savez(path, **arrays)
    blob = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flipped":
        path.write_bytes(blob[:600] + bytes(b ^ 0xFF for b in blob[600:700]) + blob[700:])
    return data_dir


@pytest.mark.parametrize("damage,needle", [("truncated", "malformed MNIST-1D cache"), ("flipped", "malformed MNIST-1D cache"),
                                           ("labels", "train labels range over [0, 12]")])
def test_a_damaged_dataset_file_gets_one_line(tmp_path, capsys, damage, needle):
    """A truncated or damaged MNIST-1D cache, or labels outside the classes: exit 2 and one line naming the
    file (the labels are checked for every dataset as it is loaded)."""
    data_dir = make_cache(tmp_path, damage)
    assert main(["train", "--dataset", "mnist1d", "--dataset-size", "100", "--model", "mlp", "--batch-size", "16",
                 "--quiet", "--data-dir", str(data_dir), "--output", str(tmp_path / "run")]) == 2
    one_line_error(capsys, needle)


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


class _CallsNdarray:
    """A pickle that asks numpy.ndarray itself for a 64 x 3072 array: uninitialised memory, sized by the file."""

    def __reduce__(self):
        import numpy as np

        return (np.ndarray, ((64, 3072), "u1"))


class _HugeReconstruct:
    """A pickle that asks numpy's reconstruction for a 1 TiB array before any data."""

    def __reduce__(self):
        import numpy as np

        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (1 << 40,), b"b"))


class _ObjectArray:
    """A pickle of an object array declaring a million entries and holding three (numpy would allocate
    the declared size, then read past the list)."""

    def __reduce__(self):
        import numpy as np

        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (1 << 20,), np.dtype("O"), False, [1, 2, 3]))


@pytest.mark.parametrize("payload", [_CallsNdarray(), _HugeReconstruct(), _ObjectArray()],
                         ids=["ndarray-call", "1TiB-reconstruct", "object-array"])
def test_cifar_reader_never_allocates_what_a_file_only_declares(tmp_path, payload):
    """A few hundred bytes of pickle cannot make the CIFAR reader allocate an array they do not hold: the
    file is refused as malformed, naming it (a real batch still reads)."""
    import pickle

    import numpy as np

    from saef.zoo.datasets.cifar import _read_cifar_batch

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": payload, b"labels": [0] * 64}, protocol=2))
    assert path.stat().st_size < 400
    with pytest.raises(ValueError, match="malformed CIFAR file .*data_batch_1"):
        _read_cifar_batch(path, b"labels")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}, protocol=2))
    pixels, labels = _read_cifar_batch(path, b"labels")
    assert pixels.shape == (2, 3072) and labels.tolist() == [3, 4]


def _tiny():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _backward(model, seed, nan=False):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    loss = F.cross_entropy(model(torch.randn(8, 4, generator=g)), torch.randint(0, 3, (8,), generator=g))
    loss.backward()
    if nan:
        next(model.parameters()).grad[0, 0] = float("nan")


def _trained(compressor, steps=3):
    """A small model and its saef.SAEF optimizer after ``steps`` steps."""
    model = _tiny()
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor=compressor)
    for seed in range(steps):
        opt.zero_grad()
        _backward(model, seed)
        opt.step()
    return model, opt


def test_the_optimizer_skips_a_non_finite_step_before_it_touches_state():
    """saef.SAEF.step with a NaN in a gradient changes neither the parameters nor any state tensor, warns,
    and counts the skip; the next finite step proceeds."""
    import torch

    model = _tiny()
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor="topk:0.3")
    _backward(model, 1)
    opt.step()
    before = opt.state_dict()
    opt.zero_grad()
    _backward(model, 2, nan=True)
    with pytest.warns(UserWarning, match="step skipped"):
        opt.step()
    after = opt.state_dict()
    assert opt.skipped_steps == 1 and torch.equal(after["state"]["x"], before["state"]["x"])
    for name, tensor in before["state"]["algorithm"]["tensors"].items():
        assert torch.equal(after["state"]["algorithm"]["tensors"][name], tensor), name
    opt.zero_grad()
    _backward(model, 3)
    opt.step()
    assert opt.ef_state.step == 2 and bool(torch.isfinite(opt.x).all())


def test_simulate_skips_non_finite_steps():
    """A NaN gradient in saef.simulate skips that step (with a warning): the result is that of the run
    without the step, and finite."""
    import torch

    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    calls = {"n": 0}

    def grad(k, x):
        calls["n"] += 1
        g = x[0] - target
        return [g * float("nan") if calls["n"] in (5, 6) else g]  # both workers of step 2

    with pytest.warns(UserWarning, match="1 of 10 steps skipped"):
        got = saef.simulate(grad, [torch.zeros(3, dtype=torch.float64)], workers=2, steps=10, lr=0.1, momentum=0.5,
                            compressor="sign")
    want = saef.simulate(lambda k, x: [x[0] - target], [torch.zeros(3, dtype=torch.float64)], workers=2, steps=9,
                         lr=0.1, momentum=0.5, compressor="sign")
    assert torch.equal(got[0], want[0])


def test_sparse_gradients_are_refused():
    """A sparse gradient (nn.Embedding(sparse=True)) is refused with a message saying what to change."""
    import torch
    from torch import nn

    emb = nn.Embedding(10, 4, sparse=True)
    opt = saef.SAEF(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse=False"):
        opt.step()


def test_optimizer_state_of_another_compressor_needs_reset_errors():
    """Loading a top-k optimizer's state into a sign optimizer is refused, naming the setting; with
    reset_errors=True the parameters and step carry over and momentum and errors start from zero."""
    import torch

    _, topk = _trained("topk:0.3")
    saved = topk.state_dict()
    sign = saef.SAEF(_tiny().parameters(), lr=0.1, momentum=0.9, compressor="sign")
    with pytest.raises(ValueError, match="saved with compressor = 'topk:0.3'.*reset_errors=True"):
        sign.load_state_dict(saved)
    sign.load_state_dict(saved, reset_errors=True)
    assert torch.equal(sign.x, topk.x) and sign.ef_state.step == 3
    assert all(torch.count_nonzero(t) == 0 for t in sign.ef_state.tensors.values())


def test_the_optimizer_reads_momentum_and_weight_decay_every_step():
    """Like torch.optim.SGD, saef.SAEF reads momentum and weight decay from its parameter group every step,
    so a scheduler that changes them (OneCycleLR cycles the momentum) takes effect: with the identity
    compressor, 20 steps under OneCycleLR equal torch.optim.SGD's (allclose 1e-6)."""
    import torch

    a, b = _tiny(), _tiny()
    ours = saef.SAEF(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, compressor="identity")
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=20, base_momentum=0.5, max_momentum=0.95)
                 for o in (ours, ref)]
    for step in range(20):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            _backward(model, step)
            opt.step()
        for schedule in schedules:
            schedule.step()
        ours.param_groups[0]["weight_decay"] = ref.param_groups[0]["weight_decay"] = 1e-3 * (1 + step)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-6)
    assert ours.param_groups[0]["momentum"] != 0.9  # the schedule did change it


def _groups(model, lr=0.1):
    """Two parameter groups of _tiny() with their own lr, momentum and weight decay."""
    return [{"params": model[0].parameters(), "lr": lr, "momentum": 0.9},
            {"params": [model[2].weight], "weight_decay": 1e-2, "momentum": 0.0}]


def test_parameter_groups_and_add_param_group_follow_sgd():
    """Per-group lr, momentum and weight decay, and a group added after 5 steps with add_param_group (its
    own lr and momentum), with a scheduler on top: with the identity compressor, 15 steps equal
    torch.optim.SGD's (allclose 1e-6). Before it is added, the last bias is not trained by either."""
    import torch

    a, b = _tiny(), _tiny()
    ours = saef.SAEF(_groups(a), lr=0.05, momentum=0.5, compressor="identity")
    ref = torch.optim.SGD(_groups(b), lr=0.05, momentum=0.5)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (ours, ref)]
    for step in range(15):
        if step == 5:
            for model, opt in ((a, ours), (b, ref)):
                opt.add_param_group({"params": [model[2].bias], "lr": 0.3, "momentum": 0.8})
        for model, opt in ((a, ours), (b, ref)):
            model.zero_grad()
            _backward(model, step)
            opt.step()
        for schedule in schedules:
            schedule.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-6)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]


def test_parameter_groups_with_compression_and_state_round_trip():
    """With top-k, a group's lr scales what its layers send (lr 0 for one group: its layers never move,
    its errors stay zero, while the other group trains), an added group starts with zero state while the
    others keep theirs, and state_dict/load_state_dict round-trips the groups (a different grouping is
    refused)."""
    import torch

    model = _tiny()
    groups = _groups(model)
    groups[1]["lr"] = 0.0
    opt = saef.SAEF(groups, lr=0.05, compressor="topk:0.3")
    frozen = model[2].weight.detach().clone()
    for step in range(4):
        model.zero_grad()
        _backward(model, step)
        opt.step()
    layers = opt.algorithm.layout.slices
    assert torch.equal(model[2].weight, frozen) and torch.count_nonzero(opt.ef_state.worker_error[:, layers[2]]) == 0
    assert torch.count_nonzero(opt.ef_state.worker_error[:, layers[0]]) > 0
    before = {name: t.clone() for name, t in opt.ef_state.tensors.items()}
    opt.add_param_group({"params": [model[2].bias], "lr": 0.2})
    assert opt.x.numel() == sum(p.numel() for p in model.parameters())
    for name, t in opt.ef_state.tensors.items():
        old = before[name].shape[-1]
        assert torch.equal(t[..., :old], before[name]) and torch.count_nonzero(t[..., old:]) == 0
    model.zero_grad()
    _backward(model, 9)
    opt.step()
    saved = opt.state_dict()
    again = saef.SAEF(_groups(_tiny()), lr=0.05, compressor="topk:0.3")
    with pytest.raises(ValueError, match="parameter groups"):
        again.load_state_dict(saved)
    again.add_param_group({"params": [again.param_groups[0]["params"][0].new_zeros(3, requires_grad=True)]})
    again.load_state_dict(saved)
    assert torch.equal(again.x, opt.x) and [g["lr"] for g in again.param_groups] == [0.1, 0.0, 0.2]


def test_the_simulator_takes_a_parameter_the_forward_does_not_use():
    """A parameter unused in forward gets a zero gradient instead of an error (which used to switch the
    simulator's fast paths off for good and then raise): no warning, the stacked path stays, and without
    momentum or weight decay the unused parameter does not move."""
    import warnings

    import torch
    from torch import nn

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Partial()
    start = model.unused.weight.detach().clone()
    sim = saef.Simulator(model, workers=2, compressor="identity")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sim.step(torch.randn(8, 4), torch.randint(0, 3, (8,)), lr=0.1)
    assert sim.stacked is not None
    sim.load_into(model)
    assert torch.equal(model.unused.weight, start) and not torch.equal(model.used.weight, Partial().used.weight)


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_stops_every_rank_at_once(tmp_path):
    """Rank 0 alone opens the run directory; when it cannot (here it exists and is not empty) every rank
    stops at once with exit 2 -- rank 0 with its own message, the others naming rank 0's -- instead of
    the others waiting out --timeout at the next collective."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    start = time.monotonic()
    codes, errs = ranks_with([["--timeout", "120"], ["--timeout", "120"]], out, timeout=150)
    assert codes == [2, 2], errs
    assert "already exists and is not empty" in errs[0]
    assert "rank 0 failed: FileExistsError" in errs[1] and time.monotonic() - start < 90  # not the 120 s timeout


def test_weights_written_after_construction_are_kept():
    """Weights loaded into the model after the optimizer was built are not overwritten by the next step:
    at lr = 0 the model keeps them, as with torch.optim.SGD."""
    import torch

    model, pretrained = _tiny(), _tiny()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)
    opt = saef.SAEF(model.parameters(), lr=0.0, momentum=0.9, compressor="sign")
    model.load_state_dict(pretrained.state_dict())
    _backward(model, 0)
    opt.step()
    for p, q in zip(model.parameters(), pretrained.parameters()):
        assert torch.equal(p, q)


def test_write_x_puts_the_model_iterate_into_the_parameters():
    """opt.write_x() writes x (not x - e_k) into the parameters, to save the model; training goes on
    after it with x unchanged."""
    import torch

    model, opt = _trained("topk:0.3")
    x = opt.x.clone()
    assert not torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), x)  # they hold x - e_k
    opt.write_x()
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), x)
    opt.zero_grad()
    _backward(model, 9)
    opt.step()
    assert opt.ef_state.step == 4 and bool(torch.isfinite(opt.x).all())


def test_a_parameter_without_gradient_is_left_as_it_was():
    """As torch.optim.SGD does, saef.SAEF leaves a parameter whose .grad is None alone -- no momentum, no
    weight decay, no error change -- while the others train: with the identity compressor, 10 steps on a
    model whose second head is never used equal SGD's, and that head never moves."""
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({"body": nn.Linear(4, 3), "spare": nn.Linear(4, 3)})

    def run(make_opt):
        net = model()
        opt = make_opt(net.parameters())
        for seed in range(10):
            opt.zero_grad()
            g = torch.Generator().manual_seed(seed)
            torch.nn.functional.cross_entropy(net["body"](torch.randn(8, 4, generator=g)),
                                              torch.randint(0, 3, (8,), generator=g)).backward()
            opt.step()
        return net

    ours = run(lambda ps: saef.SAEF(ps, lr=0.1, momentum=0.9, weight_decay=0.01, compressor="identity"))
    ref = run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01))
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours["spare"].weight, model()["spare"].weight)


def test_allreduce_server_with_a_compressor_is_refused():
    """server='allreduce' moves dense values both ways: asking it to carry a server compressor (or a
    compressed uplink) is refused at construction, naming the servers that can."""
    import torch

    with pytest.raises(ValueError, match="use server='sharded' or 'rank0'"):
        saef.SAEF([torch.zeros(3, requires_grad=True)], lr=0.1, compressor="identity", server_compressor="sign",
                  server="allreduce")
    saef.SAEF([torch.zeros(3, requires_grad=True)], lr=0.1, compressor="identity", double_way=False, server="allreduce")


@pytest.mark.parametrize("compressor", ["powersgd:1", "randk:0.5", "qsgd:4:bf16"])
def test_the_optimizer_runs_the_random_and_stateful_compressors(compressor):
    """saef.SAEF with a random or stateful compressor: a parameter without a gradient keeps its compressor
    state too (PowerSGD's Q), add_param_group extends that state, and the state round-trips exactly."""
    import torch

    model = _tiny()
    opt = saef.SAEF([model[0].weight, model[2].weight], lr=0.1, momentum=0.9, compressor=compressor, seed=3)
    for step in range(3):
        model.zero_grad()
        _backward(model, step)
        if step == 2:
            model[0].weight.grad = None  # idle this step
            before = {n: t.clone() for n, t in opt.ef_state.tensors.items()}
        opt.step()
    if compressor.startswith("powersgd"):
        q = opt.algorithm.state_slices["uplink"][0]
        assert torch.equal(opt.ef_state.uplink_state[:, q], before["uplink_state"][:, q])
        assert not torch.equal(opt.ef_state.uplink_state, before["uplink_state"])  # the other layer's Q moved
    opt.add_param_group({"params": [model[0].bias, model[2].bias]})
    model.zero_grad()
    _backward(model, 7)
    opt.step()
    again = saef.SAEF([model[0].weight, model[2].weight], lr=0.1, momentum=0.9, compressor=compressor, seed=3)
    again.add_param_group({"params": [model[0].bias, model[2].bias]})
    again.load_state_dict(opt.state_dict())
    for name, tensor in opt.ef_state.tensors.items():
        assert torch.equal(again.ef_state.tensors[name], tensor), name
