"""A run directory is data, never a path to somewhere else: a crafted manifest, links, pipes, oversized or
deeply nested files in it are refused with one line naming the file (exit 2), and nothing outside the
directory is read, written or deleted. Every run here is in this process. (docs/robustness.md)"""

import json
import os
import shutil

import pytest

from saef.app import checkpoint
from saef.app.cli import CONFIG_LIMIT, main

FAST = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--quiet"]
# synthetic: 16 steps per epoch; one checkpoint kept (step 16), so the resume's checkpoints evict older ones
RUN = [*FAST, "--checkpoint-every", "5", "--keep-checkpoints", "1"]
VICTIM = b"not saef's file\n"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    run = tmp_path_factory.mktemp("template") / "run"
    assert main(["train", *RUN, "--epochs", "1", "--output", str(run)]) == 0
    return run


@pytest.fixture
def run(template, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(template, copy, symlinks=True)
    return copy


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    return path


def resume(run, capsys, epochs=2):
    capsys.readouterr()
    code = main(["train", "--resume", str(run), "--epochs", str(epochs), "--quiet"])
    return code, capsys.readouterr().err.strip()


def refused(run, capsys, file_name, problem):
    """--resume exits 2 with one line naming ``file_name`` and ``problem``."""
    code, err = resume(run, capsys)
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("saef: error: "), err
    assert file_name in err and problem in err, err
    return err


def add_stale_entry(run, name):
    manifest = run / "checkpoints" / "manifest.json"
    entries = json.loads(manifest.read_text())
    manifest.write_text(json.dumps([{"step": 1, "world": 1, "files": {name: None}}, *entries]))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_manifest_cannot_name_a_file_outside_its_folder(run, victim, capsys, where):
    """A manifest entry '../../victim' or '/abs/victim' would be deleted as a stale checkpoint: refused."""
    add_stale_entry(run, "../../victim" if where == "parent" else str(victim))
    refused(run, capsys, "manifest.json", "not a plain file name")
    assert victim.read_bytes() == VICTIM
    assert not (run / "events.jsonl").exists()  # nothing of the resume was written


def test_a_stale_checkpoint_that_is_a_link_deletes_only_the_link(run, victim, capsys):
    """A listed checkpoint file that is a symbolic link: eviction removes the link, never its target."""
    add_stale_entry(run, "step-00000001.rank0.pt")
    (run / "checkpoints" / "step-00000001.rank0.pt").symlink_to(victim)
    code, err = resume(run, capsys)
    assert code == 0, err
    assert not os.path.lexists(run / "checkpoints" / "step-00000001.rank0.pt")
    assert victim.read_bytes() == VICTIM


@pytest.mark.parametrize("name", [".lock", "events.jsonl", "metrics.jsonl", "metrics.csv", "steps.jsonl", "steps.csv"])
def test_a_linked_file_in_the_run_directory_is_not_followed(run, victim, capsys, name):
    """.lock (truncated and given the pid), events.jsonl and the metrics (appended to): never through a link."""
    if os.path.lexists(run / name):
        (run / name).unlink()
    (run / name).symlink_to(victim)
    refused(run, capsys, name, "symbolic link")
    assert victim.read_bytes() == VICTIM
    assert (run / "summary.json").exists()  # the run was left as it was


def test_an_appended_file_with_another_hard_link_is_refused(run, victim, capsys):
    (run / "events.jsonl").unlink(missing_ok=True)
    os.link(victim, run / "events.jsonl")
    refused(run, capsys, "events.jsonl", "hard links")
    assert victim.read_bytes() == VICTIM


def test_a_linked_checkpoints_folder_is_not_followed(run, tmp_path, capsys):
    """checkpoints -> a folder elsewhere: neither read nor written (its files would be evicted)."""
    elsewhere = tmp_path / "elsewhere"
    (run / "checkpoints").rename(elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    refused(run, capsys, "checkpoints", "symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == before


@pytest.mark.parametrize("name", ["config.json", "checkpoints/manifest.json"])
def test_a_device_or_a_pipe_is_not_read(run, capsys, name):
    """config.json or manifest.json -> /dev/zero (a link), or a FIFO in their place: refused, not read."""
    path = run / name
    path.unlink()
    path.symlink_to("/dev/zero")
    refused(run, capsys, path.name, "symbolic link")
    path.unlink()
    os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    refused(run, capsys, path.name, "not a regular file")


def test_a_deeply_nested_manifest_or_config_gets_one_line(run, capsys):
    deep = "[" * 100000 + "]" * 100000
    (run / "checkpoints" / "manifest.json").write_text(deep)
    refused(run, capsys, "manifest.json", "nested too deeply")
    (run / "config.json").write_text('{"a": ' + deep + "}")
    refused(run, capsys, "config.json", "nested too deeply")


def test_an_oversized_manifest_or_config_is_refused_before_it_is_read(run, capsys):
    """Sparse files larger than the limits: refused from their size, without reading them."""
    manifest = run / "checkpoints" / "manifest.json"
    os.truncate(manifest, checkpoint.MANIFEST_LIMIT + 1)
    refused(run, capsys, "manifest.json", "bytes")
    os.truncate(run / "config.json", CONFIG_LIMIT + 1)
    refused(run, capsys, "config.json", "bytes")


def test_an_oversized_metrics_file_is_refused_before_it_is_read(run, capsys):
    """metrics.jsonl beyond its limit (a sparse file of 256 MiB + 1): saef plot and --resume refuse it from its
    size, with one line, without reading it."""
    from saef.app.records import METRICS_LIMIT

    os.truncate(run / "metrics.jsonl", METRICS_LIMIT + 1)
    capsys.readouterr()
    assert main(["plot", str(run), "-o", str(run.parent / "curves.png")]) == 2
    err = capsys.readouterr().err
    assert f"holds {METRICS_LIMIT + 1} bytes" in err and err.count("\n") == 1, err
    assert not (run.parent / "curves.png").exists()
    refused(run, capsys, "metrics.jsonl", "bytes")


def test_an_untouched_run_still_resumes(run, capsys):
    """The checks refuse nothing saef wrote: the copy resumes, evicting its old checkpoint."""
    code, err = resume(run, capsys)
    assert code == 0, err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["manifest.json", "step-00000032.rank0.pt"]


def test_a_deeply_nested_metrics_row_gets_one_line(run):
    """The metrics reader (also of saef plot) turns a row nested 100,000 deep into a ValueError naming it."""
    from saef.app.records import read_metrics

    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is nested too deeply"):
        read_metrics(run)
