"""The baselines study's bookkeeping: its plan, and that each method is reported at the lr its own held-out
score chose (never the test set's), from run directories written here."""

import json
import math

from saef.studies import baselines, reproduce, runs as study_runs
from saef.studies.reproduce import Run, plan


def test_plan_covers_every_method_and_lr_once_with_seed_0():
    runs = plan("baselines", seeds=2, libsvm_file="/data/a9a")
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) and {r.config["seed"] for r in runs} == {0}
    mnist = [r for r in runs if r.config["dataset"] == "mnist1d"]
    assert len(mnist) == len(baselines.mnist_methods()) * len(baselines.MNIST_LRS)
    assert all(r.config["holdout"] == 1000 and r.config["workers"] == 8 for r in mnist)
    a9a = [r for r in runs if r.config["dataset"] == "libsvm"]
    assert all(r.config["full_batch"] and r.config["workers"] == 20 and not r.config["double_way"] for r in a9a)
    assert {r.config["compressor"] for r in a9a} == {"topk:0.01", "topk:0.1", "randk:0.01:unbiased", "randk:0.1:unbiased"}
    assert not [r for r in plan("baselines", seeds=1) if r.config["dataset"] == "libsvm"]  # no file: no a9a part
    argv = study_runs._command(a9a[0], study_runs.Path("/tmp/x"), None)
    assert "--full-batch" in argv and "True" not in argv


def _write(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text("{}")


def _row(epoch, test_acc, val_acc=None, grad=None, mb=1.0):
    return {"epoch": epoch, "step": epoch, "test_acc": test_acc, "val_acc": val_acc, "grad_norm_sq": grad, "test_loss": 0.5,
            "bits_up": mb * 4e6, "bits_down": mb * 4e6, "bits_averaging": 0}


def test_each_method_is_reported_at_the_lr_its_held_out_score_chose(tmp_path):
    """MNIST-1D: lr 0.1 has the better held-out accuracy and lr 0.3 the better test accuracy: 0.1 is reported.
    a9a: the lr whose final ||grad f||^2 is smallest is chosen, and a run that ended in NaN is never chosen."""
    base = dict(dataset="mnist1d", model="cnn1d", method="saef", compressor="topk:0.01", workers=8, double_way=True,
                momentum=0.9, epochs=2, holdout=1000)
    runs = []
    for lr, val, test in ((0.1, 0.9, 0.80), (0.3, 0.7, 0.95)):
        for seed in range(2):
            run = Run.make(**base, lr=lr, seed=seed)
            _write(tmp_path / run.name, [_row(1, test - 0.1, val - 0.1), _row(2, test, val)])
            runs.append(run)
    a9a = dict(dataset="libsvm", data_file="/d/a9a", model="logreg", method="ef21", compressor="topk:0.01", workers=20,
               double_way=False, momentum=0.0, epochs=2, full_batch=True, seed=0)
    for lr, grad in ((0.1, 1e-3), (0.3, 1e-6), (1.0, math.nan)):
        run = Run.make(**a9a, lr=lr)
        _write(tmp_path / run.name, [_row(1, 0.7, grad=1.0), _row(2, 0.7, grad=grad)])
        runs.append(run)
    # a third lr whose seed 0 diverged (no summary) while seed 1 scored best on held-out: the choice is seed
    # 0's, and a diverged run scores lowest, so it is not chosen
    for seed, val in ((0, None), (1, 0.99)):
        run = Run.make(**base, lr=0.03, seed=seed)
        if val is not None:
            _write(tmp_path / run.name, [_row(1, 0.9, 0.9), _row(2, 0.97, val)])
        runs.append(run)
    read = lambda d: reproduce.read_rows(d) if reproduce.is_done(d) else None  # noqa: E731
    chosen = baselines.select(runs, tmp_path, read)
    by_dataset = {dict(k)["dataset"]: v for k, v in chosen.items()}
    assert by_dataset["mnist1d"]["lr"] == 0.1 and len(by_dataset["mnist1d"]["seeds"]) == 2
    assert by_dataset["libsvm"]["lr"] == 0.3
    text, figures = baselines.report(runs, tmp_path, tmp_path / "out", read)
    assert "| SAEF p=∞ topk:0.01 | 0.1 |" in text and "80.00 ± 0.00" in text and "| EF21 topk:0.01, mu=0 | 0.3 |" in text
    assert all(path.is_file() for path in figures) and len(figures) == 2


def test_confirm_runs_the_other_seeds_at_each_chosen_lr(tmp_path):
    """The second phase: seeds 1 .. S-1 at the lr seed 0 chose, for MNIST-1D and for rand-k on a9a; none for
    deterministic gradient descent."""
    first = [r for r in plan("baselines", seeds=3, libsvm_file="/d/a9a")
             if r.config["compressor"] in ("topk:0.01", "randk:0.1:unbiased") and r.config["method"] in ("saef", "direct")
             and r.config.get("average_every") is None and r.config["momentum"] in (0.0, 0.9)]
    for run in first:  # the score rises with the lr up to 0.1, then falls
        lr = run.config["lr"]
        good = 1 - abs(math.log10(lr) + 1)
        _write(tmp_path / run.name, [_row(1, 0.5, val_acc=good, grad=10 ** -good)])
    more = baselines.confirm(Run.make, first, 3, tmp_path, lambda d: reproduce.read_rows(d))
    assert {(r.config["dataset"], r.config["lr"], r.config["seed"]) for r in more} == {
        (d, 0.1, s) for d in ("mnist1d", "libsvm") for s in (1, 2)}
    assert all(r.config["compressor"] != "topk:0.01" for r in more if r.config["dataset"] == "libsvm")


def test_baselines_without_the_a9a_file_is_a_one_line_error(tmp_path, capsys):
    """`saef reproduce baselines` looks nowhere by default for a9a: without --libsvm-file, or with one that is
    not a file, it exits 2 with one line on stderr naming the flag, and starts no run."""
    for extra in ([], ["--libsvm-file", str(tmp_path / "missing")]):
        code = reproduce.main(["baselines", "--dry-run", "--runs", str(tmp_path / "runs"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "--libsvm-file" in err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "a9a").write_text("+1 1:1\n")
    assert reproduce.main(["baselines", "--dry-run", "--runs", str(tmp_path / "runs"), "--libsvm-file", str(tmp_path / "a9a")]) == 0
    assert "libsvm_a9a" in capsys.readouterr().out
