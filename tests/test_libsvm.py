"""The LIBSVM problem of the error-feedback literature: the reader (validated line by line), logistic regression
with the non-convex regulariser (objective and gradient against hand-computed values), full-batch training
(equal to plain gradient descent on f with the identity compressor), and a distributed run against the
simulator. The data is generated here; nothing reads ../shared/data."""

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from saef.app.cli import main
from saef.app.feed import evaluate, gradient_norm_sq
from saef.zoo.datasets import load_dataset, load_libsvm
from saef.zoo.models import build_model

from _procs import launch, wait_all  # (tests/ is on the path: conftest.py is there)

def write_libsvm(path, n=120, d=9, seed=0, labels=(-1, 1)):
    """A heterogeneous binary problem: samples sorted by label, so contiguous shards differ."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, d, generator=g) < 0.4).float() * torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = torch.where(x @ w + 0.3 * torch.randn(n, generator=g) > 0, labels[1], labels[0])
    order = torch.argsort(y, stable=True)
    lines = []
    for i in order.tolist():
        pairs = " ".join(f"{j + 1}:{x[i, j].item():.6g}" for j in range(d) if x[i, j] != 0)
        lines.append(f"{int(y[i])} {pairs}".strip())
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reader_maps_labels_and_fills_a_dense_matrix(tmp_path):
    f = tmp_path / "a.svm"
    f.write_text("+1 1:0.5 3:-2 # a comment\n-1 2:1\n\n1 4:3e-1\n")
    data = load_libsvm(f)
    assert data.input_shape == (4,) and data.num_classes == 2 and data.test is data.train
    assert torch.equal(data.train.targets, torch.tensor([1, 0, 1]))
    assert torch.equal(data.train.inputs, torch.tensor([[0.5, 0, -2, 0], [0, 1, 0, 0], [0, 0, 0, 0.3]]))
    zero_one = tmp_path / "b.svm"
    zero_one.write_text("0 1:1\n1 2:1\n")
    test = tmp_path / "b.t"
    test.write_text("1 5:1\n")
    both = load_libsvm(zero_one, test)
    assert both.input_shape == (5,) and torch.equal(both.train.targets, torch.tensor([0, 1]))
    assert both.test.inputs.shape == (1, 5) and both.digest.count(":") == 1


@pytest.mark.parametrize("text, problem", [
    ("2 1:1\n1 2:1\n", "labels must be -1/\\+1 or 0/1"), ("1 1:1\n-1 2:1\n0 3:1\n", "labels must be"),
    ("1 1-2\n", "line 1: not LIBSVM"), ("1 0:1\n", "indices start at 1"), ("1 1:nan\n", "not finite"),
    ("x 1:1\n", "line 1: not LIBSVM"), ("\n# only a comment\n", "holds no samples"), ("1\n-1\n", "has no features"),
])
def test_reader_refuses_what_is_not_a_binary_libsvm_file(tmp_path, text, problem):
    f = tmp_path / "bad.svm"
    f.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_libsvm(f)


def test_reader_refuses_binary_files_and_directories(tmp_path):
    f = tmp_path / "bin.svm"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not a text file"):
        load_libsvm(f)
    with pytest.raises(ValueError, match="is a directory"):
        load_libsvm(tmp_path)
    with pytest.raises(ValueError, match="needs data_file"):
        load_dataset("libsvm", tmp_path)
    with pytest.raises(ValueError, match="data_file is for datasets libsvm and text"):
        load_dataset("mnist1d", tmp_path, data_file=str(f))


def test_objective_and_gradient_equal_the_formula(tmp_path):
    """evaluate() gives f(x) = mean log(1 + exp(-b a^T x)) + 0.1 sum x^2 / (1 + x^2), and gradient_norm_sq
    ||grad f(x)||^2, both against float64 computations of the formula at a random x."""
    data = load_libsvm(write_libsvm(tmp_path / "p.svm"))
    model = build_model("logreg", data)
    x = torch.randn(9, dtype=torch.float64)
    with torch.no_grad():
        model.linear.weight.copy_(x.float().unsqueeze(0))
    a, b = data.train.inputs.double(), data.train.targets.double() * 2 - 1
    xf = x.float().double().requires_grad_(True)
    f = torch.nn.functional.softplus(-b * (a @ xf)).mean() + 0.1 * (xf.square() / (1 + xf.square())).sum()
    (grad,) = torch.autograd.grad(f, xf)
    assert math.isclose(evaluate(model, data.train, "cpu")["loss"], f.item(), rel_tol=1e-5)
    assert math.isclose(gradient_norm_sq(model, data.train, "cpu"), grad.square().sum().item(), rel_tol=1e-4)


def saef_train(args):
    """``saef train --quiet ARGS`` in this process (the command line, without a Python and torch start-up):
    its exit code and what it wrote to stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--quiet", *args])
    return SimpleNamespace(returncode=code, stderr=stderr.getvalue())


def rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_full_batch_sgd_is_gradient_descent_on_f(tmp_path):
    """--full-batch with the identity compressor (method sgd, K = 4 contiguous shards of a label-sorted file,
    momentum 0) is gradient descent on f: x_T and ||grad f(x_t)||^2 after each step equal a float64 GD
    (rtol 1e-4)."""
    f = write_libsvm(tmp_path / "p.svm")
    run = tmp_path / "run"
    common = ["--dataset", "libsvm", "--data-file", str(f), "--model", "logreg", "--full-batch", "--workers", "4",
              "--momentum", "0", "--lr", "0.5", "--epochs", "12", "--lr-milestones", "100"]
    result = saef_train([*common, "--method", "sgd", "--output", str(run)])
    assert result.returncode == 0, result.stderr
    data = load_libsvm(f)
    a, b = data.train.inputs.double(), data.train.targets.double() * 2 - 1
    x = torch.zeros(9, dtype=torch.float64)
    expected = []
    for _ in range(12):
        xr = x.clone().requires_grad_(True)
        loss = torch.nn.functional.softplus(-b * (a @ xr)).mean() + 0.1 * (xr.square() / (1 + xr.square())).sum()
        (g,) = torch.autograd.grad(loss, xr)
        x = x - 0.5 * g
        xr = x.clone().requires_grad_(True)
        loss = torch.nn.functional.softplus(-b * (a @ xr)).mean() + 0.1 * (xr.square() / (1 + xr.square())).sum()
        expected.append(torch.autograd.grad(loss, xr)[0].square().sum().item())
    got = [r["grad_norm_sq"] for r in rows(run)]
    assert [r["step"] for r in rows(run)] == list(range(1, 13))
    assert all(math.isclose(u, v, rel_tol=1e-4) for u, v in zip(got, expected)), (got, expected)
    # a compressed rule on the same problem makes progress on ||grad f||^2 too
    ef21 = tmp_path / "ef21"
    result = saef_train([*common, "--method", "ef21", "--compressor", "topk:0.2", "--output", str(ef21)])
    assert result.returncode == 0, result.stderr
    norms = [r["grad_norm_sq"] for r in rows(ef21)]
    assert norms[-1] < 0.5 * norms[0]


@pytest.mark.slow
def test_distributed_full_batch_matches_the_simulator(tmp_path):
    """Two gloo processes (each adding the regulariser to its loss) and the simulator agree on the metrics
    of a full-batch EF21 run (rtol 1e-5)."""
    f = write_libsvm(tmp_path / "p.svm")
    args = ["--dataset", "libsvm", "--data-file", str(f), "--model", "logreg", "--full-batch", "--workers", "2",
            "--method", "ef21", "--compressor", "topk:0.3", "--epochs", "6", "--quiet"]
    sim = tmp_path / "sim"
    assert saef_train([*args, "--output", str(sim)]).returncode == 0
    dist = tmp_path / "dist"
    procs = launch(["-m", "saef", "train", *args, "--backend", "dist", "--timeout", "20", "--output", str(dist)], 2,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_all(procs, timeout=120) == [0, 0], [p.stderr.read() for p in procs]
    for a, b in zip(rows(sim), rows(dist)):
        for key in ("train_loss", "test_loss", "grad_norm_sq"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a[key], b[key])
        assert a["bits_up"] == b["bits_up"]


def test_resume_refuses_a_changed_data_file(tmp_path):
    """The file's SHA-256 is part of the run's identity: after the file changes, --resume is refused with a
    message, and nothing of the run is lost."""
    f = write_libsvm(tmp_path / "p.svm")
    run = tmp_path / "run"
    args = ["--dataset", "libsvm", "--data-file", str(f), "--model", "logreg", "--full-batch", "--workers", "2", "--epochs", "2"]
    assert saef_train([*args, "--output", str(run)]).returncode == 0
    before = (run / "metrics.jsonl").read_text()
    f.write_text(f.read_text().replace("1:", "2:", 1))
    resumed = saef_train(["--resume", str(run), "--epochs", "4"])
    assert resumed.returncode == 2 and "sha256" in resumed.stderr, resumed.stderr
    resumed = saef_train(["--resume", str(run), "--epochs", "4", "--reset-errors"])  # resets the errors, not the data
    assert resumed.returncode == 2 and "sha256" in resumed.stderr, resumed.stderr
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("text, problem", [
    ("1 100000000:1\n-1 1:1\n", "line 1: feature index 100000000 is above the largest read, 1,048,576"),
    ("-1 1:1\n1 1000000000:1\n", "line 2: feature index 1000000000 is above"),
    ("1 3:1e39\n-1 1:1\n", "line 1: a value is not finite in float32"),
    ("1 3:-3.4028236e38\n", "line 1: a value is not finite in float32"),  # rounds to -inf in float32
])
def test_reader_bounds_the_width_and_checks_values_in_float32(tmp_path, text, problem):
    """A huge feature index is refused at its line (the features are held densely, the model too), before
    anything of that width is allocated; a value finite in float64 but not in float32 is refused."""
    f = tmp_path / "bad.svm"
    f.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_libsvm(f)
    ok = tmp_path / "ok.svm"
    ok.write_text("1 1048576:3.4028234e38\n-1 1:-1\n")  # the widest index and the largest float32 load
    assert torch.isfinite(load_libsvm(ok).train.inputs).all() and load_libsvm(ok).input_shape == (1 << 20,)


def test_size_keeps_the_samples_subsample_keeps(tmp_path):
    """--dataset-size picks its rows while reading, exactly those (and in the order) subsample picks."""
    from saef.zoo.datasets.base import subsample

    f = write_libsvm(tmp_path / "a.svm", n=200)
    whole = load_libsvm(f)
    for size, seed in ((37, 0), (37, 5), (199, 1), (200, 2), (500, 3)):
        part = load_libsvm(f, size=size, seed=seed)
        expected = subsample(whole.train, size, seed)
        assert torch.equal(part.train.inputs, expected.inputs) and torch.equal(part.train.targets, expected.targets)
        assert part.test is part.train and part.digest == whole.digest
    via = load_dataset("libsvm", tmp_path, size=37, seed=5, data_file=str(f))
    assert torch.equal(via.train.inputs, subsample(whole.train, 37, 5).inputs)


def test_bad_data_file_exits_2_with_one_line(tmp_path):
    """saef train on a file with a feature index beyond the bound: exit 2, one line naming the file."""
    f = tmp_path / "wide.svm"
    f.write_text("1 100000000:1\n-1 1:1\n")
    result = saef_train(["--dataset", "libsvm", "--data-file", str(f), "--model", "logreg", "--output", str(tmp_path / "run")])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert str(f) in result.stderr and "line 1" in result.stderr and "1,048,576" in result.stderr
