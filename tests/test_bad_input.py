"""What a run refuses to start from: integers out of range, an unbounded timeout, unreadable config files,
paths of the wrong kind, dataset sizes beyond what is generated, and damaged or malicious data files. Each
stops with exit 2 and one line naming what is wrong, before anything is written."""

import pytest

from saef.app.cli import main

FAST = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "32", "--quiet"]


def test_timeout_must_be_finite(capsys):
    """--timeout bounds every wait, so it must be finite: inf is refused with one line naming the key."""
    assert main(["train", *FAST, "--timeout", "inf"]) == 2
    assert "timeout = inf is not allowed" in capsys.readouterr().err


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


def one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saef: error: ") and needle in err, err


@pytest.mark.parametrize("text,needle", [
    ("lr_decay = " + "1" * 5000, "huge.toml is not a usable TOML file: Exceeds the limit"),
    ("lr_milestones = " + "[" * 5000 + "]" * 5000, "huge.toml is not a usable TOML file: nested too deeply"),
    ("# " + "x" * (2 << 20), "huge.toml is larger than 1048576 bytes"),
])
def test_config_files_beyond_what_tomllib_takes_are_one_line(tmp_path, capsys, text, needle):
    """A 5000-digit integer (Python's int conversion limit), an array nested 5000 deep (recursion) or a file
    of megabytes: one line naming the file, exit 2, not a traceback; nothing written."""
    (tmp_path / "huge.toml").write_text(text + "\n")
    out = tmp_path / "run"
    assert main(["train", *FAST, "--config", str(tmp_path / "huge.toml"), "--output", str(out)]) == 2
    one_line_error(capsys, needle)
    assert not out.exists()


def test_a_config_that_is_a_fifo_or_a_device_is_refused_unread(tmp_path, capsys):
    """--config naming a FIFO with no writer (which a plain open would wait on for ever) or /dev/zero: one
    line naming the file and what it is, exit 2, at once."""
    import os
    import signal

    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    def blocked(*_):
        raise RuntimeError("blocked for 10 s")  # (a blocked open fails the test instead of hanging it)

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    try:
        for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a device")):
            assert main(["train", *FAST, "--config", str(path), "--output", str(tmp_path / "run")]) == 2
            one_line_error(capsys, f"cannot be read: it is {kind}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "run").exists()


def test_lr_above_float32_range_is_one_line(tmp_path, capsys):
    """--lr 1e308 is finite as a Python float but Inf in float32: refused with one line naming lr and its range."""
    assert main(["train", *FAST, "--lr", "1e308", "--output", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "lr must be in [0, 3.40282e+38]")


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
    np.savez(path, **arrays, made_from=np.array([100, 0]))  # (the size and seed it is for, as saef's caches record)
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
