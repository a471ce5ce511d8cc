"""Plots of run directories: labels, reading, grouping over seeds, and PNG files written whole."""

import json
import warnings

import pytest

from saef.app.plots import group_runs, plot_run, plot_runs, read_run, run_label, runs_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(directory, epochs=4, seed=0, **overrides):
    """A fake run directory with ``epochs`` rows of plausible metrics; ``overrides`` go into the config."""
    config = {"method": "saef", "compressor": "sign", "workers": 4, "double_way": True, "average_every": None,
              "momentum": 0.9, "lr": 0.1, "dataset": "mnist1d", "model": "mlp", "epochs": epochs,
              "batch_size": 128, "seed": seed}
    config.update(overrides)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    sgd = config["method"] == "sgd"
    lines = []
    for epoch in range(1, epochs + 1):
        acc = 0.5 + 0.1 * epoch + 0.01 * seed
        lines.append(json.dumps({
            "epoch": epoch, "step": 100 * epoch, "lr": 0.1, "train_loss": 2.0 / epoch + 0.01 * seed,
            "test_loss": 2.1 / epoch, "test_acc": acc, "test_loss_aux": None if sgd else 2.0 / epoch,
            "test_acc_aux": None if sgd else acc + 0.01, "bits_up": 1000 * epoch, "bits_down": 1000 * epoch,
            "bits_averaging": 0, "mismatch_ef": None if sgd else 0.5 / epoch,
            "mismatch_saef": None if sgd else 0.1 / epoch, "epoch_time": 1.0, "wall_time": 1.0 * epoch,
        }))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.mark.parametrize("config, expected", [
    ({"method": "saef", "compressor": "topk:0.01", "workers": 4, "double_way": True, "average_every": None},
     "SAEF topk:0.01 DC K=4"),
    ({"method": "ef", "compressor": "sign", "workers": 4, "double_way": False, "average_every": 10},
     "EF sign SC K=4 p=10"),
    ({"method": "sgd", "compressor": "identity", "workers": 4, "double_way": True, "average_every": None},
     "SGD (full precision) K=4"),
])
def test_run_label(config, expected):
    """run_label gives METHOD compressor DC|SC K=.. [p=..], and 'SGD (full precision)' without compression."""
    assert run_label(config) == expected


def test_plot_run_writes_png_in_run_dir(tmp_path):
    """plot_run writes a whole PNG to run_dir/curves.png by default and leaves no temporary file behind."""
    run = write_run(tmp_path / "run")
    out = plot_run(run)
    assert out == run / "curves.png"
    assert_png(out)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "metrics.jsonl"]


def test_plot_run_handles_nulls_and_zero_mismatch(tmp_path):
    """A full-precision SGD run (null x~ metrics and mismatch) and a run with zero mismatch still plot."""
    assert_png(plot_run(write_run(tmp_path / "sgd", method="sgd", compressor="identity"), tmp_path / "a.png"))
    run = write_run(tmp_path / "zero")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.update(mismatch_ef=0.0, mismatch_saef=0.0, bits_up=0, bits_down=0)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_png(plot_run(run, tmp_path / "b.png"))


def test_plot_runs_writes_png(tmp_path):
    """plot_runs overlays runs of different configs into one whole PNG at out_png (parents created)."""
    runs = [write_run(tmp_path / "saef"), write_run(tmp_path / "ef", method="ef"),
            write_run(tmp_path / "sgd", method="sgd", compressor="identity")]
    out = plot_runs(runs, tmp_path / "figs" / "compare.png")
    assert out == tmp_path / "figs" / "compare.png"
    assert_png(out)


def test_same_label_runs_are_grouped(tmp_path):
    """Runs sharing a label become one curve labelled '(n seeds)'; the legend has one entry per group."""
    runs = [write_run(tmp_path / f"saef{s}", seed=s) for s in range(3)]
    runs.append(write_run(tmp_path / "ef", method="ef"))
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["SAEF sign DC K=4 (3 seeds)", "EF sign DC K=4"]
    assert [len(g.rows) for g in groups] == [3, 1]
    fig = runs_figure(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [g.label for g in groups]


def test_given_labels_override_and_group(tmp_path):
    """Given labels replace run_label and group runs themselves; a wrong count of labels is a ValueError."""
    runs = [write_run(tmp_path / f"r{i}", seed=i) for i in range(3)]
    assert [g.label for g in group_runs(runs, labels=["a", "b", "a"])] == ["a (2 seeds)", "b"]
    with pytest.raises(ValueError, match="one label per run"):
        group_runs(runs, labels=["a"])


def test_grouping_different_hyperparameters_warns(tmp_path):
    """Runs grouped under one label but with different lr trigger a warning naming the key."""
    runs = [write_run(tmp_path / "a", seed=0, lr=0.1), write_run(tmp_path / "b", seed=1, lr=0.01)]
    with pytest.warns(UserWarning, match="lr"):
        group_runs(runs)


def test_missing_metrics_names_file(tmp_path):
    """A run directory without metrics.jsonl raises FileNotFoundError naming that file."""
    run = write_run(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_run(run)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(run)
    assert not (run / "curves.png").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    """A malformed line in the middle of metrics.jsonl is a ValueError naming the file and the line number."""
    run = write_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_run(run)


def test_unfinished_last_line_is_skipped(tmp_path):
    """A cut-off last line (a run still writing, or killed mid-write) is skipped with a warning."""
    run = write_run(tmp_path / "run", epochs=3)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 4, "train_')
    with pytest.warns(UserWarning, match="unfinished"):
        config, rows = read_run(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_rewritten_epoch_keeps_last_row(tmp_path):
    """When an epoch appears twice (a resumed run), rows are sorted by epoch and the later line wins."""
    run = write_run(tmp_path / "run", epochs=2)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 2, "train_loss": 0.123}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rows = read_run(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["train_loss"] == 0.123
