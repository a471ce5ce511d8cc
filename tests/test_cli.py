"""The ``saef`` command: a short run writes complete records; bad input exits 2 with one line."""

import csv
import json
import subprocess
import sys

import pytest

from saef.app.cli import main
from saef.app.records import METRIC_COLUMNS

FAST = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--quiet"]


def test_two_epoch_run_writes_every_record(tmp_path, capsys):
    """A 2-epoch run on the synthetic set writes config, environment, metrics (CSV and JSON lines, one row
    per epoch), the figure and the summary, and they all parse."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "2", "--compressor", "sign", "--average-every", "5", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["compressor"] == "sign" and config["average_every"] == 5 and config["workers"] == 4
    env = json.loads((out / "environment.json").read_text())
    assert {"torch", "python", "git_revision", "device"} <= set(env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(set(r) == set(METRIC_COLUMNS) for r in rows)
    assert rows[1]["bits_up"] == 2 * rows[0]["bits_up"] > 0
    assert rows[1]["bits_averaging"] > 0 and rows[0]["mismatch_saef"] is not None
    with open(out / "metrics.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 and float(table[1]["test_acc"]) == pytest.approx(rows[1]["test_acc"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    printed = capsys.readouterr().out
    assert "final test accuracy at x" in printed


def test_sgd_baseline_has_no_auxiliary_metrics(tmp_path):
    """The full-precision baseline records dense bit counts and leaves x~ metrics empty."""
    out = tmp_path / "sgd"
    assert main(["train", *FAST, "--epochs", "1", "--method", "sgd", "--output", str(out)]) == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["test_acc_aux"] is None and row["mismatch_ef"] is None
    assert row["bits_up"] == row["bits_down"]


@pytest.mark.parametrize("method", ["ef21", "direct"])
def test_rules_without_auxiliary_iterate_leave_its_metrics_empty(tmp_path, capsys, method):
    """EF21 and direct train from the command line; their records leave x~ and the mismatch terms empty
    (not faked), count compressed bits, and the summary names the rule."""
    out = tmp_path / method
    assert main(["train", *FAST, "--epochs", "1", "--method", method, "--compressor", "sign", "--output", str(out)]) == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["test_acc_aux"] is None and row["mismatch_ef"] is None and row["mismatch_saef"] is None
    assert 0 < row["bits_up"] < row["step"] * 32 * 1000 and row["bits_averaging"] == 0
    assert json.loads((out / "config.json").read_text())["method"] == method
    assert f"{method} (sign, double-way, K=4)" in capsys.readouterr().out


BAD = [
    (["--method", "ef21", "--average-every", "4"], "average_every applies to"),
    (["--method", "direct", "--average-every", "1"], "average_every"),
    (["--method", "sgd", "--average-every", "3"], "no error to average"),
    (["--average-every", "0"], "average_every"),
    (["--compressor", "topk:2"], "rho"),
    (["--batch-size", "30"], "divisible by workers"),
    (["--momentum", "1.5"], "momentum"),
    (["--workers", "0"], "workers"),
    (["--method", "adam"], "method"),
    (["--method", "sgd", "--compressor", "sign"], "compressor"),
    (["--lr", "abc"], "--lr"),
    (["--optimizer", "adam", "--betas", "0.9,1.5"], "betas must be two numbers in [0, 1)"),
    (["--optimizer", "adam", "--betas", "0.9,x"], "--betas"),
    (["--optimizer", "adam", "--eps", "0"], "eps must be a finite number > 0"),
    (["--optimizer", "adam", "--method", "ef21"], "method 'ef21' is defined with the optimizers sgd"),
    (["--eps", "1e-6"], "eps=1e-06 is Adam's"),
    (["--optimizer", "lamb"], "optimizer must be one of sgd, adam"),
    # local steps and the compressors of that regime
    (["--local-steps", "0"], "local_steps = 0 is not allowed"),
    (["--local-steps", "2", "--method", "ef21"], "local steps are defined for the rules ef, saef and direct"),
    (["--inner-optimizer", "adamw"], "applies with local steps"),
    (["--outer-lr", "0.5"], "applies with local steps"),
    (["--local-steps", "2", "--nesterov"], "nesterov=True needs outer_momentum > 0"),
    (["--local-steps", "2", "--optimizer", "adam"], "with local steps the workers' optimizer is inner_optimizer"),
    (["--error-decay", "0"], "error_decay must be in (0, 1]"),
    (["--error-decay", "0.9", "--method", "direct"], "error_decay applies to the rules that keep a worker error"),
    (["--compressor", "topk:0.1:chunk=1"], "chunk must be an integer >= 2"),
    (["--compressor", "sign:int3"], ":int8, :int4 or :int2"),
    (["--compressor", "dcttopk"], "dcttopk needs the fraction kept"),
    (["--log-every", "-1"], "log_every = -1 is not allowed"),
]


@pytest.mark.parametrize("flags,needle", BAD)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, needle):
    """A bad value exits with code 2 and one line naming the problem; no run directory is made."""
    out = tmp_path / "run"
    code = _exit_code(["train", *FAST, "--output", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


@pytest.mark.parametrize(
    "toml,needle",
    [
        ('workers = 4\nlearning_rate = 0.1\n', "unknown config key 'learning_rate'"),
        ('workers = "four"\n', "workers must be an integer"),
        ('double_way = 1\n', "double_way must be true or false"),
        ('compressor = "topk:2"\n', "rho"),
        ('batch_size = 30\nworkers = 4\n', "batch_size"),
        ('lr = [\n', "not valid TOML"),
        ('optimizer = "adam"\nbetas = ["a", "b"]\n', "betas must be a list of numbers"),
    ],
)
def test_bad_config_file_exits_2(tmp_path, capsys, toml, needle):
    """Unknown keys and wrong types in the TOML file are rejected naming the key, exit code 2."""
    path = tmp_path / "run.toml"
    path.write_text(toml)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


def test_flags_override_config_file(tmp_path):
    """A flag overrides the same key of the config file."""
    path = tmp_path / "run.toml"
    path.write_text('dataset = "synthetic"\nmodel = "mlp"\nepochs = 5\nbatch_size = 32\nlr_milestones = [1]\naverage_every = "never"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--epochs", "1", "--quiet", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 1 and config["lr_milestones"] == [1] and config["average_every"] is None


def test_simulator_names_the_multi_process_settings_it_does_not_use(tmp_path, capsys):
    """--overlap and --server change nothing in one process: the run says so once, and its rows are those of
    the same run without them; a run without them gets no note."""
    rows = {}
    for name, flags in (("plain", []), ("flagged", ["--overlap", "--server", "rank0"])):
        out = tmp_path / name
        assert main(["train", *FAST, "--epochs", "1", "--output", str(out), *flags]) == 0
        printed = capsys.readouterr().out
        assert ("does not use server, overlap" in printed) == bool(flags)
        rows[name] = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_time", "wall_time")}
                      for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows["flagged"] == rows["plain"]


def test_adam_settings_reach_the_algorithm_from_toml_and_flags(tmp_path):
    """optimizer, betas and eps in a TOML file (betas overridden by a flag) make the run's algorithm Adam
    with those settings (its state holds m and v), and the records name them."""
    path = tmp_path / "run.toml"
    path.write_text('optimizer = "adam"\nbetas = [0.8, 0.99]\neps = 1e-4\nlr = 0.003\nwarmup_steps = 5\ncompressor = "sign"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), *FAST, "--epochs", "1", "--betas", "0.85,0.995", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["optimizer"], config["betas"], config["eps"]) == ("adam", [0.85, 0.995], 1e-4)
    from saef.app.config import TrainConfig
    algorithm = TrainConfig(**{k: v for k, v in config.items()}).algorithm()
    assert (algorithm.optimizer, algorithm.betas, algorithm.eps, algorithm.momentum) == ("adam", (0.85, 0.995), 1e-4, 0.0)
    assert json.loads((out / "summary.json").read_text())["final_test_acc"] > 0


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    """An existing non-empty output directory is refused (exit 2) and left untouched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", *FAST, "--epochs", "1", "--output", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    assert "already exists" in capsys.readouterr().err


def test_missing_cifar_folder_names_where_to_put_files(tmp_path, capsys):
    """A missing dataset folder gives exit 2 and says where the files go."""
    code = main(["train", "--dataset", "cifar10", "--model", "resnet20", "--data-dir", str(tmp_path), "--output", str(tmp_path / "r")])
    assert code == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_entry_point():
    """``python -m saef`` runs the same command line (here: a bad rho, exit code 2)."""
    result = subprocess.run([sys.executable, "-m", "saef", "train", "--compressor", "topk:2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "rho" in result.stderr


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_plot_command_overlays_runs_and_rejects_non_runs(tmp_path, capsys):
    """``saef plot RUN... -o FILE`` writes a PNG from run directories; a folder that is not a run exits 2."""
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        assert main(["train", *FAST, "--epochs", "1", "--seed", str(seed), "--output", str(out)]) == 0
        runs.append(str(out))
    png = tmp_path / "both.png"
    assert main(["plot", *runs, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "config.json" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_progress_lines_where_no_bar_shows(tmp_path, capsys, monkeypatch):
    """Output that is not a terminal (here: captured) gets a progress line every --log-every steps, or by
    default every 30 seconds (here made 0 s), each with the mean train loss since the last; --quiet none."""
    from saef.app import progress

    fast = ["train", "--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--epochs", "1"]
    assert main([*fast, "--log-every", "5", "--output", str(tmp_path / "a")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert [line.split("step ")[1].split()[0] for line in lines] == ["5/16", "10/16", "15/16"]
    assert all("train loss" in line for line in lines)
    assert main([*fast, "--output", str(tmp_path / "b")]) == 0
    assert " step " not in capsys.readouterr().out  # (a second-long run: no 30-second line)
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    assert main([*fast, "--output", str(tmp_path / "c")]) == 0
    assert sum(" step " in line for line in capsys.readouterr().out.splitlines()) == 15
    assert main([*fast, "--quiet", "--log-every", "1", "--output", str(tmp_path / "d")]) == 0
    assert " step " not in capsys.readouterr().out


def test_tensorboard_gets_the_metrics_and_every_steps_loss(tmp_path, capsys):
    """--tensorboard writes each epoch's metrics at its step and every step's train loss as scalars in
    RUN/tensorboard, equal to the records; a resumed run drops the events after its checkpoint, so each step
    is there once."""
    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package (pip install saef[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from saef.app.records import read_metrics

    from saef.app import hooks

    out = tmp_path / "run"
    fast = ["train", "--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--quiet", "--tensorboard"]

    def stop_at_12(step, rank):
        if step == 12:
            raise KeyboardInterrupt  # (after steps 11 and 12 were logged; the newest checkpoint is step 10)

    hooks.after_step.append(stop_at_12)
    try:
        assert main([*fast, "--epochs", "2", "--checkpoint-every", "5", "--output", str(out)]) == 130
    finally:
        hooks.after_step.remove(stop_at_12)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    rows = read_metrics(out)
    acc = board.Scalars("test_acc")
    assert [e.step for e in acc] == [16, 32] and [e.value for e in acc] == pytest.approx([r["test_acc"] for r in rows])
    steps = board.Scalars("train_loss_step")
    assert sorted(e.step for e in steps) == list(range(1, 33))
    assert sum(e.value for e in steps[:16]) / 16 == pytest.approx(rows[0]["train_loss"], rel=1e-6)
