"""saef.SAEF as a LightningModule's optimizer (SAEF with scaled sign, every step), on 2 CPU processes.

    python examples/lightning_optimizer.py          # 2 CPU processes, launched by Lightning

Lightning's ``strategy="ddp"`` wraps the module in DistributedDataParallel, which would all-reduce every
gradient: a callback registers ``saef.local_gradients_hook`` on that wrapper, so DDP sends nothing and
saef.SAEF makes the one (compressed) exchange. Between steps the parameters hold x - e_k, the point where
SAEF takes each rank's gradient, so validation runs inside ``opt.evaluation_point("x")`` (the hooks of
``Classifier`` below): every rank then validates the same shared model x. (A small MLP on random data:
seconds.)
"""

import hashlib

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import saef


class LocalGradients(L.Callback):
    """Makes the strategy's DDP wrapper exchange nothing, so that saef.SAEF is the one exchange."""

    def on_fit_start(self, trainer, pl_module):
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(None, saef.local_gradients_hook)


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        self._at_x = None

    def training_step(self, batch, _):
        inputs, targets = batch
        return F.cross_entropy(self.net(inputs), targets)

    def validation_step(self, batch, _):
        inputs, targets = batch
        self.log("val_loss", F.cross_entropy(self.net(inputs), targets), sync_dist=True)

    def on_validation_start(self):  # evaluate x, the model every rank shares
        self._at_x = self.optimizers().optimizer.evaluation_point("x")
        self._at_x.__enter__()

    def on_validation_end(self):
        self._at_x.__exit__(None, None, None)

    def configure_optimizers(self):  # (called once the processes are set up: saef.SAEF sees all of them)
        return saef.SAEF(self.parameters(), lr=0.05, momentum=0.9, method="saef", compressor="sign")


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g))
    model = Classifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[LocalGradients()], max_steps=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=2, val_check_interval=4)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    trainer.fit(model, loader, loader)
    opt = trainer.optimizers[0]
    with opt.evaluation_point("x"):
        digest = hashlib.sha256(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes()).hexdigest()
    print(f"saef optimizer (rank {trainer.global_rank}): val loss {trainer.callback_metrics['val_loss']:.4f}; "
          f"sent {opt.bits['bits_up'] / 8e3:.1f} kB per worker up in {opt.rounds} rounds; x {digest[:16]}", flush=True)


if __name__ == "__main__":
    main()
