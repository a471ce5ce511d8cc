"""The transformer workload: the byte corpus from the standard library, the GPT, bf16 autocast, and a run of
``saef train --dataset text --model gpt`` end to end."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import saef
from saef.app.cli import main
from saef.zoo.datasets import load_dataset
from saef.zoo.models import build_model
from saef.zoo.datasets.text import byte_windows, read_corpus, split_corpus

TEXT = SimpleNamespace(num_classes=256, input_shape=(16,), name="text")


def test_corpus_is_the_stdlib_in_sorted_order_and_cut_to_size():
    """The default corpus is the first N bytes of the standard library's .py files in sorted path order:
    the same bytes on every call, a prefix of a longer corpus, and exactly N long."""
    small, where = read_corpus(size=5000)
    large, _ = read_corpus(size=20000)
    assert len(small) == 5000 and large[:5000] == small and ".py files of" in where
    assert read_corpus(size=5000)[0] == small


def test_windows_predict_the_next_byte_and_splits_are_contiguous():
    """Each sample's targets are its inputs shifted by one byte; the validation split is the last 10 %."""
    corpus = bytes(range(200)) * 3
    inputs, targets = byte_windows(corpus, context=9)
    assert inputs.shape == targets.shape == (60, 9) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert bytes(inputs[1].tolist()) == corpus[10:19] and targets[1, -1] == corpus[19]
    train, val = split_corpus(corpus)
    assert train + val == corpus and len(val) == 60


def test_text_dataset_from_a_file_and_its_digest(tmp_path):
    """--data-file reads any text file; its SHA-256 is the data's digest (part of a checkpoint's identity);
    a corpus too short for one window is refused naming the context."""
    path = tmp_path / "book.txt"
    path.write_bytes(b"abcdefgh" * 500)
    data = load_dataset("text", tmp_path, data_file=str(path), context=15)
    assert data.train.inputs.shape[1] == 15 and data.num_classes == 256 and data.tokens
    path.write_bytes(b"abcdefgx" * 500)
    assert load_dataset("text", tmp_path, data_file=str(path), context=15).digest != data.digest
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="too short for context 15"):
        load_dataset("text", tmp_path, data_file=str(path), context=15)


def test_gpt_is_causal_and_ties_its_output_to_the_embedding():
    """Logits (N, 256, T); changing byte j changes no logit before position j; the output layer is the
    token embedding (its gradient gets both uses)."""
    torch.manual_seed(0)
    model = build_model("gpt", TEXT, width=32, layers=2, heads=4)
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens)
    assert out.shape == (2, 256, 16)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    again = model(changed)
    assert torch.allclose(out[..., :10], again[..., :10], atol=1e-6)
    assert not torch.allclose(out[..., 10:], again[..., 10:])
    hidden = model.norm(model.blocks[1](model.blocks[0](model.token(tokens) + model.position.weight[:16])))
    assert torch.allclose(out, (hidden @ model.token.weight.T).transpose(1, 2), atol=1e-5)


def test_gpt_refuses_what_it_cannot_model():
    with pytest.raises(ValueError, match="multiple of heads"):
        build_model("gpt", TEXT, width=30, heads=4)
    with pytest.raises(ValueError, match="byte sequences"):
        build_model("gpt", SimpleNamespace(num_classes=10, input_shape=(1, 40), name="mnist1d"))


def test_simulated_gpt_workers_equal_separate_models():
    """K = 2 simulated workers (a loop, as the GPT asks) with the identity compressor and plain SGD take the
    mean of the gradients that two separate copies of the model compute on their halves of the batch."""
    torch.manual_seed(0)
    model = build_model("gpt", TEXT, width=32, layers=1, heads=2)
    reference = build_model("gpt", TEXT, width=32, layers=1, heads=2)
    reference.load_state_dict(model.state_dict())
    tokens, targets = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    sim = saef.Simulator(model, workers=2, method="ef", compressor="identity", double_way=False)
    assert sim.vectorize is False
    sim.step(tokens, targets, lr=0.1)
    grads = [torch.autograd.grad(F.cross_entropy(reference(tokens[2 * k:2 * k + 2]), targets[2 * k:2 * k + 2]),
                                 list(reference.parameters())) for k in range(2)]
    want = torch.cat([(p.detach() - 0.1 * (a + b) / 2).reshape(-1) for p, a, b in zip(reference.parameters(), *grads)])
    assert torch.allclose(sim.x, want, atol=1e-6)


def test_bf16_runs_the_forward_in_bf16_and_keeps_the_state_fp32():
    """precision="bf16": the gradients differ from fp32's by bf16 rounding (not zero, under 5 % of their
    norm), while x, the momentum and the errors stay fp32; an unknown precision is refused."""
    torch.manual_seed(0)
    model = build_model("gpt", TEXT, width=32, layers=1, heads=2)
    tokens, targets = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    sims = {}
    for precision in ("fp32", "bf16"):
        copy = build_model("gpt", TEXT, width=32, layers=1, heads=2)
        copy.load_state_dict(model.state_dict())
        sims[precision] = saef.Simulator(copy, workers=2, compressor="topk:0.1", momentum=0.9, precision=precision)
        sims[precision].step(tokens, targets, lr=0.1)
    m32, m16 = (sims[p].state.worker_momentum for p in ("fp32", "bf16"))
    assert m16.dtype == torch.float32 and sims["bf16"].state.worker_error.dtype == torch.float32
    assert 0 < (m16 - m32).norm() / m32.norm() < 0.05
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        saef.Simulator(model, workers=2, precision="fp16")


def test_train_a_small_gpt_end_to_end(tmp_path, capsys):
    """saef train --dataset text --model gpt with SAEF-Adam in bf16 writes records whose bits per byte are the
    validation loss / ln 2, at x and x~; a bad pairing of model and dataset exits 2 naming it."""
    out = tmp_path / "run"
    args = ["train", "--dataset", "text", "--model", "gpt", "--dataset-size", "30000", "--context", "16", "--gpt-width", "32",
            "--gpt-layers", "1", "--gpt-heads", "2", "--optimizer", "adam", "--lr", "0.003", "--eps", "1e-6",
            "--warmup-steps", "20", "--compressor", "sign", "--average-every", "10", "--batch-size", "32", "--epochs", "2",
            "--precision", "bf16", "--quiet", "--output", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["test_bpb"] == pytest.approx(row["test_loss"] / math.log(2))
        assert row["test_bpb_aux"] == pytest.approx(row["test_loss_aux"] / math.log(2))
    assert rows[-1]["test_bpb"] < 8.0  # below a uniform guess over 256 bytes
    assert main(["train", "--dataset", "text", "--output", str(tmp_path / "bad")]) == 2
    assert "model gpt and dataset text go together" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    assert main(["train", "--dataset", "text", "--model", "gpt", "--data-file", str(missing), "--output", str(tmp_path / "bad")]) == 2
    assert str(missing) in capsys.readouterr().err and not (tmp_path / "bad").exists()
