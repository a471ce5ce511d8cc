"""saef.SAEF, the optimizer facade for users' own training loops: like torch.optim.SGD it reads its
parameter groups every step, takes add_param_group, leaves a parameter without gradient alone and keeps
weights written into the model; it skips a non-finite step before touching state, refuses what it cannot
do, and its state round-trips (the random and stateful compressors' too). Against torch.optim.SGD with the
identity compressor and against the one-worker simulator. (On processes: test_distributed.py; with
optimizer adam: test_adam.py.)"""

import re

import pytest
import torch
import torch.nn.functional as F

import saef
from torch import nn

from _problems import batches, small_model, tiny_batches, tiny_mlp


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _backward(model, seed, nan=False):
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
    model = _tiny()
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor="topk:0.3")
    _backward(model, 1)
    opt.step()
    before = opt.state_dict()
    opt.zero_grad()
    _backward(model, 2, nan=True)
    with pytest.warns(UserWarning, match="step was skipped"):
        opt.step()
    after = opt.state_dict()
    assert opt.skipped_steps == 1 and torch.equal(after["state"]["x"], before["state"]["x"])
    for name, tensor in before["state"]["algorithm"]["tensors"].items():
        assert torch.equal(after["state"]["algorithm"]["tensors"][name], tensor), name
    opt.zero_grad()
    _backward(model, 3)
    opt.step()
    assert opt.ef_state.step == 2 and bool(torch.isfinite(opt.x).all())


def test_sparse_gradients_are_refused():
    """A sparse gradient (nn.Embedding(sparse=True)) is refused with a message saying what to change."""
    emb = nn.Embedding(10, 4, sparse=True)
    opt = saef.SAEF(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse=False"):
        opt.step()


def test_optimizer_state_of_another_compressor_needs_reset_errors():
    """Loading a top-k optimizer's state into a sign optimizer is refused, naming the setting; with
    reset_errors=True the parameters and step carry over and momentum and errors start from zero."""
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


def test_weights_written_after_construction_are_kept():
    """Weights loaded into the model after the optimizer was built are not overwritten by the next step:
    at lr = 0 the model keeps them, as with torch.optim.SGD."""
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


def _write(way, p, value):
    if way == "data =":
        p.data = value.clone()
    elif way == "data.copy_":
        p.data.copy_(value)
    else:
        with torch.no_grad():
            p.copy_(value)


@pytest.mark.parametrize("way", ["data =", "data.copy_", "no_grad copy_"])
def test_weights_written_through_data_are_kept(way):
    """README: weights written into the parameters become x at the next step -- also through ``p.data = t``
    and ``p.data.copy_(t)``, which leave the version counter alone (seen by value): at lr = 0 the model keeps
    them, and after training the next step starts from them exactly as after ``p.copy_(t)`` under no_grad."""
    model, pretrained = _tiny(), _tiny()
    opt = saef.SAEF(model.parameters(), lr=0.0, momentum=0.9, compressor="sign")
    for p, q in zip(model.parameters(), pretrained.parameters()):
        _write(way, p, q.detach() + 1.0)
    _backward(model, 0)
    opt.step()
    for p, q in zip(model.parameters(), pretrained.parameters()):
        assert torch.equal(p, q + 1.0)
    runs = []
    for how in (way, "no_grad copy_"):
        model, opt = _trained("sign")
        _write(how, model[0].weight, torch.ones(6, 4))
        opt.zero_grad()
        _backward(model, 7)
        opt.step()
        runs.append(opt.x)
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], _trained("sign", steps=4)[1].x)  # (the write made a difference)


def test_a_parameter_replaced_by_another_shape_is_refused():
    """``p.data = t`` with t of another shape: the next step refuses it, naming the parameter and both shapes."""
    model, opt = _trained("sign", steps=1)
    model[0].weight.data = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"parameter 0 now holds a tensor of shape \(4, 6\).*layer 0 is \(6, 4\)"):
        opt.step()


def test_load_state_dict_compares_shapes_layer_by_layer_and_refuses_other_states():
    """A state of layers shaped [6, 4] is refused by an optimizer of [4, 6] (same total size), naming the
    layer and both shapes; a torch.optim.SGD state or one missing entries is a ValueError naming what is missing."""
    a, b = nn.Parameter(torch.zeros(6, 4)), nn.Parameter(torch.zeros(4, 6))
    ours = saef.SAEF([b], lr=0.1)
    with pytest.raises(ValueError, match=r"layer 0 has shape \(6, 4\), the optimizer's has \(4, 6\)"):
        ours.load_state_dict(saef.SAEF([a], lr=0.1).state_dict())
    with pytest.raises(ValueError, match="lacks 'x', 'algorithm', 'ledger'"):
        ours.load_state_dict(torch.optim.SGD([b], lr=0.1).state_dict())
    state = saef.SAEF([nn.Parameter(torch.ones(4, 6))], lr=0.1).state_dict()
    del state["state"]["ledger"]
    with pytest.raises(ValueError, match="lacks 'ledger'"):
        ours.load_state_dict(state)
    with pytest.raises(ValueError, match="needs 'state' and 'param_groups'"):
        ours.load_state_dict({})


@pytest.mark.parametrize("lr,dtype,top", [(1e308, torch.float32, "3.40282e+38"), (1e5, torch.float16, "65504")])
def test_lr_beyond_the_parameters_range_is_refused(lr, dtype, top):
    """An lr above float32's largest number, or above the parameters' dtype's, is a ValueError naming lr and
    the range (at construction, or at the first step for the dtype), not an overflow later."""
    p = nn.Parameter(torch.zeros(3, dtype=dtype))
    with pytest.raises(ValueError, match=re.escape(f"lr must be in [0, {top}]")):
        opt = saef.SAEF([p], lr=lr)
        p.grad = torch.zeros_like(p)
        opt.step()


def test_write_x_puts_the_model_iterate_into_the_parameters():
    """opt.write_x() writes x (not x - e_k) into the parameters, to save the model; training goes on
    after it with x unchanged."""
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
    with pytest.raises(ValueError, match="use server='sharded' or 'rank0'"):
        saef.SAEF([torch.zeros(3, requires_grad=True)], lr=0.1, compressor="identity", server_compressor="sign",
                  server="allreduce")
    saef.SAEF([torch.zeros(3, requires_grad=True)], lr=0.1, compressor="identity", double_way=False, server="allreduce")


@pytest.mark.parametrize("compressor", ["powersgd:1", "randk:0.5", "qsgd:4:bf16"])
def test_the_optimizer_runs_the_random_and_stateful_compressors(compressor):
    """saef.SAEF with a random or stateful compressor: a parameter without a gradient keeps its compressor
    state too (PowerSGD's Q), add_param_group extends that state, and the state round-trips exactly."""
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


def test_optimizer_identity_equals_sgd_with_scheduler():
    """The SAEF optimizer with identity compression equals torch.optim.SGD in a user's loop with a
    MultiStepLR schedule."""
    data = batches(12)
    models = [small_model(), small_model()]
    opts = [
        saef.SAEF(models[0].parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, compressor="identity"),
        torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
    ]
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, milestones=[4, 8], gamma=0.1) for o in opts]
    for inputs, targets in data:
        for model, opt, sched in zip(models, opts, scheds):
            opt.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            opt.step()
            sched.step()
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.001)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_equals_one_worker_simulator():
    """One SAEF optimizer in a user's loop equals the simulator with K = 1 (same algorithm, same points)."""
    data = batches(6)
    model = small_model()
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor="topk:0.2")
    sim = saef.Simulator(small_model(), workers=1, compressor="topk:0.2", momentum=0.9)
    for inputs, targets in data:
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()
        sim.step(inputs, targets, lr=0.1)
    assert torch.allclose(opt.x, sim.x, rtol=1e-5, atol=1e-6)
    with opt.evaluation_point("x"):
        flat = saef.core.flatten([p.detach() for p in model.parameters()])
        assert torch.equal(flat, opt.x)
    # outside the context the parameters hold the SAEF gradient point x - e
    flat = saef.core.flatten([p.detach() for p in model.parameters()])
    assert torch.allclose(flat, opt.x - opt.ef_state.worker_error[0])


def test_optimizer_state_dict_holds_everything():
    """The optimizer's state dict holds momentum, errors, step and counters, and restores a run exactly."""
    data = batches(6)
    model = small_model()
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, compressor="sign")
    for inputs, targets in data[:3]:
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()
    saved = opt.state_dict()
    for key in ("worker_momentum", "worker_error", "server_error"):
        assert key in saved["state"]["algorithm"]["tensors"]
    assert saved["state"]["algorithm"]["step"] == 3 and set(saved["state"]["ledger"]) >= {"bits_up", "bits_down", "bits_averaging"}
    assert "x" in saved["state"]
    clone = small_model(seed=9)
    opt2 = saef.SAEF(clone.parameters(), lr=0.5, momentum=0.9, compressor="sign")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.1
    for m, o in ((model, opt), (clone, opt2)):
        for inputs, targets in data[3:]:
            o.zero_grad()
            F.cross_entropy(m(inputs), targets).backward()
            o.step()
    assert torch.equal(opt.x, opt2.x)


@pytest.mark.parametrize("method", ["ef21", "direct"])
def test_optimizer_facade_runs_every_rule(method):
    """saef.SAEF(method=ef21 | direct) with one worker equals the simulator with one worker, and its state
    round-trips exactly."""
    batches = tiny_batches(6)
    net, reference = tiny_mlp(), tiny_mlp()
    opt = saef.SAEF(net.parameters(), lr=0.1, momentum=0.9, method=method, compressor="topk:0.3")
    sim = saef.Simulator(reference, workers=1, method=method, compressor="topk:0.3", momentum=0.9)
    for inputs, targets in batches[:3]:
        opt.zero_grad()
        F.cross_entropy(net(inputs), targets).backward()
        opt.step()
        sim.step(inputs, targets, lr=0.1)
    assert torch.allclose(opt.x, sim.x, rtol=1e-6, atol=1e-7)
    clone = tiny_mlp()
    opt2 = saef.SAEF(clone.parameters(), lr=0.1, momentum=0.9, method=method, compressor="topk:0.3")
    opt2.load_state_dict(opt.state_dict())
    for m, o in ((net, opt), (clone, opt2)):
        for inputs, targets in batches[3:]:
            o.zero_grad()
            F.cross_entropy(m(inputs), targets).backward()
            o.step()
    assert torch.equal(opt.x, opt2.x) and opt.bits == opt2.bits
