"""Use saef's optimizer in your own training loop, one process per worker.

    torchrun --nproc_per_node 2 examples/own_loop_torchrun.py            # 2 workers on this machine
    python examples/own_loop_torchrun.py                                 # 1 worker, no torch.distributed
    python examples/own_loop_torchrun.py --epochs 1 --data-dir DIR       # shorter; MNIST-1D cached in DIR

Each rank trains on its own slice of every global batch; only compressed payloads (here packed signs and
one scale per tensor) cross the network. The model is evaluated at x (what the workers hold) and at the
auxiliary iterate x~.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import saef
from saef.zoo.datasets import epoch_batches, load_dataset
from saef.zoo.models import build_model


def main():
    parser = argparse.ArgumentParser(description="saef.SAEF in a plain training loop")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", default="~/.cache/saef")
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    workers = dist.get_world_size() if dist.is_initialized() else 1

    data = load_dataset("mnist1d", args.data_dir)
    torch.manual_seed(0)
    model = build_model("cnn1d", data)
    # The optimizer broadcasts rank 0's parameters and talks to the other ranks itself.
    opt = saef.SAEF(model.parameters(), lr=0.1, momentum=0.9, method="saef", compressor="sign")
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[8], gamma=0.1)

    global_batch, order = 128, torch.Generator().manual_seed(0)  # same order on every rank
    for epoch in range(args.epochs):
        model.train()
        for indices in epoch_batches(len(data.train), global_batch, order):
            mine = indices.chunk(workers)[rank]  # this rank's shard of the global batch
            inputs, targets = data.train.batch(mine)
            opt.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad(), opt.evaluation_point("x"):
            acc = (model(data.test.inputs).argmax(1) == data.test.targets).float().mean().item()
        if rank == 0:
            bits = opt.bits["bits_up"] / 8e6
            print(f"epoch {epoch + 1}: test accuracy {100 * acc:.2f}%  ({bits:.2f} MB sent per worker so far)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
