"""saef's compression inside PyTorch Lightning, through the DDP communication hook.

    python examples/lightning_ddp_hook.py          # 2 CPU processes, launched by Lightning

A callback registers saef's hook on the strategy's DistributedDataParallel model when training starts.
(Lightning's own ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` registers it on CUDA only, and ignores
it on the CPU; the callback works on either.) The LightningModule and its optimizer (AdamW here) are
unchanged, and the parameters always hold the model. (A small MLP on random data: seconds.)
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import saef


class SaefCommHook(L.Callback):
    """Registers saef.comm_hook on the strategy's DDP model before the first step."""

    def __init__(self, state):
        self.state = state

    def on_train_start(self, trainer, pl_module):
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(self.state, saef.comm_hook)


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    def training_step(self, batch, _):
        inputs, targets = batch
        loss = F.cross_entropy(self.net(inputs), targets)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g))
    model = Classifier()
    state = saef.CommHookState(compressor="topk:0.1", method="ef", module=model)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[SaefCommHook(state)], max_steps=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    print(f"saef hook (rank {trainer.global_rank}): sent {state.bits['bits_up'] / 8e3:.1f} kB per worker up", flush=True)


if __name__ == "__main__":
    main()
