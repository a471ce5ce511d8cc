"""Tests for saef.zoo.datasets: readers, the safe unpickler, augmentation, MNIST-1D generation and caching, batching."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from saef.zoo.datasets import cifar as cifar_module
from saef.zoo.datasets import (
    CIFAR_STATS,
    DATASETS,
    RestrictedUnpickler,
    crop_flip_augment,
    epoch_batches,
    load_dataset,
)


def _write_batch(path, pixels, labels, label_key=b"labels"):
    # The official files are Python 2 pickles of dicts with bytes keys; protocol 2 from Python 3 is the same
    # format except that bytes values go through _codecs.encode, which the reader must accept.
    with open(path, "wb") as handle:
        pickle.dump({b"batch_label": b"test", label_key: labels, b"data": pixels}, handle, protocol=2)


def _random_pixels(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for i in range(1, 6):
        pixels, labels = _random_pixels(rng, 3), [int(v) for v in rng.integers(0, 10, 3)]
        _write_batch(folder / f"data_batch_{i}", pixels, labels)
        batches.append((pixels, labels))
    test_pixels, test_labels = _random_pixels(rng, 2), [7, 3]
    _write_batch(folder / "test_batch", test_pixels, test_labels)
    return tmp_path, batches, (test_pixels, test_labels)


def test_cifar10_reader_shapes_labels_and_pixel_order(cifar10_root):
    """CIFAR-10: 5 batches are concatenated in order, labels kept, and the row is R plane, G plane, B plane,
    each 32x32 row-major, normalised with the standard per-channel statistics."""
    root, batches, (test_pixels, test_labels) = cifar10_root
    data = load_dataset("cifar10", root)
    assert data.train.inputs.shape == (15, 3, 32, 32) and data.train.inputs.dtype == torch.float32
    assert data.test.inputs.shape == (2, 3, 32, 32)
    assert data.train.targets.tolist() == sum((labels for _, labels in batches), [])
    assert data.test.targets.tolist() == test_labels
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32) and data.augment is not None
    mean, std = CIFAR_STATS["cifar10"]
    # Image 4 is the second image of data_batch_2; pixel (channel 2 = blue, row 5, column 7).
    raw = batches[1][0][1, 2 * 1024 + 5 * 32 + 7]
    expected = (raw / 255.0 - mean[2]) / std[2]
    assert data.train.inputs[4, 2, 5, 7].item() == pytest.approx(expected, abs=1e-5)


def test_cifar_root_may_be_the_extracted_folder(cifar10_root):
    """Passing the extracted cifar-10-batches-py/ itself as root reads the same data as its parent."""
    root, _, _ = cifar10_root
    from_parent = load_dataset("cifar10", root)
    from_folder = load_dataset("cifar10", root / "cifar-10-batches-py")
    assert torch.equal(from_parent.train.inputs, from_folder.train.inputs)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    """CIFAR-100: train/test files are read with b'fine_labels' (not the coarse ones) and 100 classes."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_pixels = _random_pixels(rng, 4)
    for name, pixels, fine in (("train", train_pixels, [99, 0, 42, 5]), ("test", _random_pixels(rng, 2), [1, 2])):
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": pixels, b"fine_labels": fine, b"coarse_labels": [0] * len(fine)}, handle, protocol=2)
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100
    assert data.train.targets.tolist() == [99, 0, 42, 5] and data.test.targets.tolist() == [1, 2]
    mean, std = CIFAR_STATS["cifar100"]
    expected = (train_pixels[3, 0 * 1024 + 31 * 32 + 0] / 255.0 - mean[0]) / std[0]
    assert data.train.inputs[3, 0, 31, 0].item() == pytest.approx(expected, abs=1e-5)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path, monkeypatch):
    """A pickle that would call os.system is refused before the call happens, directly and through the reader."""
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({b"data": _Exploit(), b"labels": [0]}, protocol=2)
    with open(tmp_path / "evil", "wb") as handle:
        handle.write(payload)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        with open(tmp_path / "evil", "rb") as handle:
            RestrictedUnpickler(handle, encoding="bytes").load()
    with pytest.raises(ValueError, match="evil"):
        cifar_module._read_cifar_batch(tmp_path / "evil", b"labels")
    assert not (tmp_path / "pwned").exists()


def test_malformed_cifar_file_names_the_file(cifar10_root):
    """A batch whose b'data' has the wrong shape raises ValueError naming that file."""
    root, _, _ = cifar10_root
    _write_batch(root / "cifar-10-batches-py" / "data_batch_3", np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root)


def test_missing_cifar_folder_says_what_is_expected(tmp_path):
    """A root without the data raises FileNotFoundError naming the folder the user must provide."""
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)


def test_augment_keeps_shape_and_is_deterministic():
    """Augmentation keeps the batch shape and is a function of the generator's seed alone."""
    images = torch.randn(16, 3, 32, 32)
    first = crop_flip_augment(images, torch.Generator().manual_seed(3))
    second = crop_flip_augment(images, torch.Generator().manual_seed(3))
    other = crop_flip_augment(images, torch.Generator().manual_seed(4))
    assert first.shape == images.shape
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_augment_output_is_a_shifted_possibly_flipped_copy():
    """Each output image equals some crop (offsets in [0, 8]) of the zero-padded, possibly flipped input."""
    images = torch.randn(6, 3, 32, 32)
    out = crop_flip_augment(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(len(images)):
        candidates = [
            crop.flip(-1) if flip else crop
            for flip in (False, True)
            for dy in range(9)
            for dx in range(9)
            for crop in [padded[i, :, dy : dy + 32, dx : dx + 32]]
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_mnist1d_generates_caches_and_is_seeded(tmp_path, monkeypatch):
    """MNIST-1D is generated once into root/mnist1d-SIZE-SEED.npz, then read back identically without
    regenerating; shapes are (N, 1, 40) float32 with 10 classes, and the caller's numpy RNG is untouched."""
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = load_dataset("mnist1d", tmp_path, size=400, seed=1)
    assert np.random.rand() == expected_next
    assert (tmp_path / "mnist1d-400-1.npz").is_file()
    assert first.train.inputs.shape == (320, 1, 40) and first.test.inputs.shape == (80, 1, 40)
    assert first.train.inputs.dtype == torch.float32 and first.num_classes == 10 and first.input_shape == (1, 40)
    assert set(first.train.targets.tolist()) == set(range(10))
    assert abs(first.train.inputs.mean().item()) < 1e-4 and abs(first.train.inputs.std().item() - 1) < 1e-2

    def refuse(*args, **kwargs):
        raise AssertionError("make_dataset called although the cache exists")

    monkeypatch.setattr("mnist1d.data.make_dataset", refuse)
    cached = load_dataset("mnist1d", tmp_path, size=400, seed=1)
    assert torch.equal(first.train.inputs, cached.train.inputs) and torch.equal(first.test.targets, cached.test.targets)
    assert [p.name for p in tmp_path.iterdir()] == ["mnist1d-400-1.npz"]  # no temporary file left behind


def test_mnist1d_same_seed_same_data(tmp_path):
    """Generating with one seed in two places gives identical data; another seed gives different data."""
    a = load_dataset("mnist1d", tmp_path / "a", size=100, seed=5)
    b = load_dataset("mnist1d", tmp_path / "b", size=100, seed=5)
    c = load_dataset("mnist1d", tmp_path / "c", size=100, seed=6)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.train.targets, b.train.targets)
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_synthetic_is_deterministic_and_diskless(tmp_path):
    """The synthetic set depends only on the seed and writes nothing under root."""
    a = load_dataset("synthetic", tmp_path, seed=0)
    b = load_dataset("synthetic", tmp_path, seed=0)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.targets, b.test.targets)
    assert a.train.inputs.shape == (512, 1, 40) and len(a.test) == 128 and a.num_classes == 10
    assert not torch.equal(a.train.inputs, load_dataset("synthetic", tmp_path, seed=1).train.inputs)
    assert list(tmp_path.iterdir()) == []


def test_digits_loads_scaled_and_split():
    """digits: (N, 1, 8, 8) inputs in [0, 1], an 80/20 split of all 1797 images, reproducible per seed."""
    pytest.importorskip("sklearn")
    data = load_dataset("digits", "unused", seed=0)
    assert data.train.inputs.shape[1:] == (1, 8, 8) and len(data.train) + len(data.test) == 1797
    assert len(data.train) == int(0.8 * 1797)
    assert data.train.inputs.min() >= 0 and data.train.inputs.max() <= 1
    assert torch.equal(data.test.targets, load_dataset("digits", "unused", seed=0).test.targets)


def test_size_subsamples_the_training_split():
    """For in-memory sets other than MNIST-1D/synthetic, size keeps that many training samples."""
    pytest.importorskip("sklearn")
    data = load_dataset("digits", "unused", size=100, seed=0)
    assert len(data.train) == 100 and len(data.test) == 1797 - int(0.8 * 1797)


def test_epoch_batches_cover_a_permutation_deterministically():
    """With drop_last every batch has batch_size distinct indices drawn from one permutation of range(n),
    and the epoch depends only on the generator's state."""
    batches = list(epoch_batches(10, 3, torch.Generator().manual_seed(0)))
    again = list(epoch_batches(10, 3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 3]
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == 9 and flat.max() < 10
    assert sum(len(b) for b in epoch_batches(10, 3, torch.Generator(), drop_last=False)) == 10
    with pytest.raises(ValueError, match="batch_size"):
        list(epoch_batches(10, 11, torch.Generator()))


def test_unknown_dataset_lists_known_names(tmp_path):
    """An unknown name raises ValueError listing every known dataset."""
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", tmp_path)
    assert all(name in str(info.value) for name in DATASETS)


def test_imagenet_without_torchvision_says_how_to_install(tmp_path, monkeypatch):
    """Without torchvision, loading ImageNet raises ImportError pointing at the imagenet extra."""
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"saef\[imagenet\]"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.slow
def test_hold_out_moves_the_last_samples_out_of_training(tmp_path):
    """hold_out(data, n): the last n training samples become the validation split and leave the training
    split; a LIBSVM test split that was the training file follows the smaller training split; bad sizes are
    refused. Through the CLI, an epoch then has (N - n) / batch steps and the records carry val_loss and
    val_acc."""
    import json
    import subprocess
    import sys

    from saef.zoo.datasets import hold_out, load_dataset

    data = load_dataset("synthetic", tmp_path, size=100)
    held = hold_out(data, 30)
    assert len(held.train) == 70 and len(held.val) == 30 and held.test is data.test
    assert torch.equal(held.val.inputs, data.train.inputs[70:]) and torch.equal(held.train.targets, data.train.targets[:70])
    for bad in (0, 100, -1):
        with pytest.raises(ValueError, match="holdout"):
            hold_out(data, bad)
    svm = tmp_path / "p.svm"
    svm.write_text("".join(f"{1 if i % 2 else -1} 1:{i}\n" for i in range(10)))
    assert hold_out(load_dataset("libsvm", tmp_path, data_file=str(svm)), 4).test.inputs.shape == (6, 1)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "saef", "train", "--quiet", "--dataset", "synthetic", "--model", "mlp",
                             "--batch-size", "32", "--epochs", "1", "--holdout", "128", "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == (512 - 128) // 32 and 0 <= row["val_acc"] <= 1 and row["val_loss"] > 0


@pytest.fixture
def alarm():
    """Fails a test that blocks (a FIFO opened without O_NONBLOCK would wait for a writer for ever)."""
    import signal

    def timeout(*_):
        raise RuntimeError("blocked for 10 s")  # (not an OSError, which a reader may turn into its own message)

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("dataset", ["libsvm", "text"])
def test_data_file_must_be_a_regular_file(tmp_path, alarm, dataset):
    """--data-file /dev/zero (endless) and a FIFO with no writer (blocks) are refused at once, naming them."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "is a device"), (str(fifo), "is a FIFO")):
        with pytest.raises(ValueError, match=f"{path} {kind}, not a"):
            load_dataset(dataset, tmp_path, data_file=path)


def test_text_file_is_read_with_a_bound(tmp_path, monkeypatch):
    from saef.zoo.datasets import text

    monkeypatch.setattr(text, "TEXT_MAX_BYTES", 1000)
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"a" * 1001)
    with pytest.raises(ValueError, match="larger than the largest corpus read, 1,000 bytes"):
        load_dataset("text", tmp_path, data_file=str(f), context=8)
    assert len(text.read_corpus(f, size=1000)[0]) == 1000
    with pytest.raises(ValueError, match="more than the largest read"):
        text.read_corpus(f, size=1001)


def test_mnist1d_cache_is_checked_against_the_size_asked_for(tmp_path):
    """A cache copied under another size's name is refused (it would train on other data), and so is one
    whose member inflates beyond what its shape holds (a deflate bomb), before it is decompressed."""
    import shutil
    import zipfile

    load_dataset("mnist1d", tmp_path, size=100, seed=0)
    shutil.copy(tmp_path / "mnist1d-100-0.npz", tmp_path / "mnist1d-200-0.npz")
    with pytest.raises(ValueError, match=r"mnist1d-200-0.npz .*not the \(160, 40\) that size 200 makes"):
        load_dataset("mnist1d", tmp_path, size=200, seed=0)
    bomb = tmp_path / "mnist1d-300-0.npz"
    with np.load(tmp_path / "mnist1d-100-0.npz") as cached, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for key, rows in (("x", 240), ("y", 240), ("x_test", 60), ("y_test", 60)):
            array = np.resize(cached[key], (rows, *cached[key].shape[1:]))
            with out.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, array)
                if key == "x":
                    member.write(bytes(50_000_000))  # 50 MB of zeros after the array: ~50 kB compressed
    with pytest.raises(ValueError, match=r"mnist1d-300-0.npz .*x.npy inflates to 50,07"):
        load_dataset("mnist1d", tmp_path, size=300, seed=0)


def test_mnist1d_cache_is_checked_against_the_seed_asked_for(tmp_path):
    """A cache copied under another seed's name (same size, so the same shapes) is refused: it records the
    size and seed it was made for. So is one that does not record them (an earlier saef's)."""
    import shutil
    import zipfile

    load_dataset("mnist1d", tmp_path, size=100, seed=0)
    shutil.copy(tmp_path / "mnist1d-100-0.npz", tmp_path / "mnist1d-100-1.npz")
    with pytest.raises(ValueError, match=r"mnist1d-100-1.npz was made for size 100 and seed 0, not size 100 and seed 1"):
        load_dataset("mnist1d", tmp_path, size=100, seed=1)
    with np.load(tmp_path / "mnist1d-100-0.npz") as cached:
        arrays = {key: cached[key] for key in ("x", "y", "x_test", "y_test")}
    np.savez(tmp_path / "mnist1d-100-2.npz", **arrays)
    with pytest.raises(ValueError, match=r"mnist1d-100-2.npz .*does not record the size and seed"):
        load_dataset("mnist1d", tmp_path, size=100, seed=2)
    again = load_dataset("mnist1d", tmp_path, size=100, seed=0)  # its own cache still loads
    assert torch.equal(again.train.targets, torch.from_numpy(arrays["y"]).long())
