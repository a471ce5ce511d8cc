"""The loco study's bookkeeping: its plan (every method and K, an lr grid where tuned, DDP-AdamW once), that
each method is reported at the lr its own held-out loss chose (never the validation split's), and that the
report and figures are made from run directories written here."""

import json

from saef.studies import loco, runs as study_runs
from saef.studies.reproduce import Run, _write_results, plan


def test_plan_covers_every_method_at_each_k_with_its_grid():
    runs = plan("loco", seeds=3)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    tuned = [m for m in loco.METHODS if m[2]]
    untuned = [m for m in loco.METHODS if not m[2]]
    per_k = (len(tuned) - 1) * len(loco.LRS) + len(untuned) * 3  # (DDP-AdamW once: it does not depend on K)
    assert len(runs) == len(loco.WORKERS) * per_k + len(loco.LRS)
    assert all(r.config["holdout"] == 2000 and r.config["epochs"] == 3 for r in runs)
    assert {r.config["seed"] for r in runs if r.config.get("local_steps")} == {0}
    argv = study_runs._command(next(r for r in runs if r.config.get("nesterov")), study_runs.Path("/x"), None)
    assert "--nesterov" in argv and "--local-steps" in argv and "True" not in argv


def test_workers_keeps_the_runs_at_those_k_and_ddp_once(capsys):
    """``saef reproduce loco --workers 8``: the K = 8 runs and DDP-AdamW (one worker: it stands for every K),
    nothing at K = 4; a K the study does not run, or --workers on a study without a K sweep: exit 2."""
    from saef.studies.reproduce import main

    every, only8 = plan("loco", seeds=3), plan("loco", seeds=3, workers=[8])
    assert {r.config["workers"] for r in only8} == {1, 8}
    assert {r.name for r in only8} == {r.name for r in every if r.config["workers"] in (1, 8)}
    assert len(plan("loco", seeds=3, workers=[4, 8])) == len(every)
    for argv in (["loco", "--workers", "5", "--dry-run"], ["adam", "--workers", "4", "--dry-run"]):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
    err = capsys.readouterr().err
    assert "runs K = 4, 8; asked for 5" in err and "--workers applies to loco only" in err


def _write(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text("{}")


def _row(epoch, val, test, rounds, mb):
    return {"epoch": epoch, "step": 432 * epoch, "rounds": rounds, "val_loss": val, "test_bpb": test, "test_bpb_aux": test - 0.1,
            "train_loss": 2.0, "bits_up": mb * 4e6, "bits_down": mb * 4e6, "bits_averaging": 0}


def test_each_method_is_reported_at_the_lr_its_held_out_loss_chose(tmp_path):
    """DiLoCo H=16 at K = 4: lr 1e-3 has the lower held-out loss and 3e-3 the lower validation bits per byte:
    1e-3 is chosen, its other seeds are planned, and the table and the K = 4 figure are written."""
    label, settings, _ = loco.METHODS[1]
    runs = []
    for lr, val, test in ((1e-3, 1.5, 2.6), (3e-3, 1.7, 2.4), (3e-4, None, None)):
        run = Run.make(**{**loco.BASE, "workers": 4, **settings, "seed": 0, "lr": lr})
        if val is not None:
            _write(tmp_path / run.name, [_row(1, val + 0.2, test + 0.2, 27, 1.0), _row(2, val, test, 54, 2.0)])
        runs.append(run)
    read = lambda d: study_runs.read_rows(d) if study_runs.is_done(d) else None  # noqa: E731
    chosen = loco.select(runs, tmp_path, read)
    assert chosen[label, 4]["lr"] == 1e-3 and chosen[label, 4]["scores"][3e-4] == float("inf")
    more = loco.confirm(Run.make, runs, 3, tmp_path, read)
    assert [(r.config["lr"], r.config["seed"]) for r in more] == [(1e-3, 1), (1e-3, 2)]
    _write_results("loco", runs, tmp_path, tmp_path / "out", "mnist1d")
    table = (tmp_path / "out" / "loco-tables.md").read_text()
    assert "| DiLoCo H=16 (fp32) | 4 | 0.0003, 0.001*, 0.003 | 1 | 2.600 ± 0.000 | 2.500 ± 0.000 | 54 | 2.00 |" in table
    assert (tmp_path / "out" / "loco-K4.png").stat().st_size > 10_000


def test_a_sitting_at_one_k_reports_the_runs_of_the_others(tmp_path):
    """--workers 8 after a sitting at K = 4: the report still covers the K = 4 runs (and their second phase)."""
    import argparse

    from saef.studies.reproduce import _reported

    label, settings, _ = loco.METHODS[1]
    done = Run.make(**{**loco.BASE, "workers": 4, **settings, "seed": 0, "lr": 1e-3})
    _write(tmp_path / done.name, [_row(1, 1.7, 2.8, 27, 1.0), _row(2, 1.5, 2.6, 54, 2.0)])
    args = argparse.Namespace(workers=[8], setting="mnist1d", seeds=3)
    reported = _reported("loco", plan("loco", seeds=3, workers=[8]), args, None, tmp_path)
    names = {r.name for r in reported}
    assert done.name in names and {r.name for r in plan("loco", seeds=3)} <= names
    assert {(r.config["workers"], r.config["lr"], r.config["seed"]) for r in reported if r.config.get("local_steps") == 16
            and r.config.get("compressor") == "identity"} >= {(4, 1e-3, 1), (4, 1e-3, 2)}  # K = 4's second phase
    _write_results("loco", reported, tmp_path, tmp_path / "out", "mnist1d")
    assert "| DiLoCo H=16 (fp32) | 4 |" in (tmp_path / "out" / "loco-tables.md").read_text()
