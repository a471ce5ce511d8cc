"""saef.SAEF as the optimizer of Hugging Face's Trainer, communicating rarely: each rank takes 4 AdamW steps,
then the ranks exchange top-k 10 % of the change with 2-bit values (SAEF-LoCo).

    torchrun --nproc_per_node 2 examples/hf_trainer_optimizer.py

Under torchrun the Trainer wraps the model in DistributedDataParallel, which would all-reduce every gradient:
a callback registers ``saef.local_gradients_hook`` on that wrapper, so DDP sends nothing and saef.SAEF makes
the one exchange. Between exchanges each rank's parameters hold its own iterate, not the shared model x, so
evaluation and saving go through ``opt.evaluation_point("x")`` (``SaefTrainer`` below): every rank then
evaluates and saves the same x. (A tiny GPT-2 built from a config, on random tokens: seconds.)
"""

import hashlib

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import saef


class LocalGradients(TrainerCallback):
    """Makes the Trainer's DDP wrapper exchange nothing, so that saef.SAEF is the one exchange."""

    def __init__(self):
        self.trainer = None

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(None, saef.local_gradients_hook)


class SaefTrainer(Trainer):
    """Evaluates and saves the shared model x, not this rank's iterate."""

    def __init__(self, *args, saef_optimizer, **kwargs):
        super().__init__(*args, optimizers=(saef_optimizer, None), **kwargs)
        self.saef_optimizer = saef_optimizer

    def evaluate(self, *args, **kwargs):
        with self.saef_optimizer.evaluation_point("x"):
            return super().evaluate(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        with self.saef_optimizer.evaluation_point("x"):
            return super().save_model(*args, **kwargs)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, samples=64, length=16, vocabulary=64, seed=0):
        self.tokens = torch.randint(0, vocabulary, (samples, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir="runs/hf_trainer_optimizer", per_device_train_batch_size=8, max_steps=8,
                             logging_steps=4, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    args.device  # (under torchrun this sets up the process group: build saef.SAEF after it)
    opt = saef.SAEF(model.parameters(), lr=3e-3, method="saef", inner_optimizer="adamw", local_steps=4,
                    compressor="topk:0.1:chunk=64:int2", outer_lr=1.0)
    callback = LocalGradients()
    trainer = SaefTrainer(model=model, args=args, train_dataset=RandomTokens(), eval_dataset=RandomTokens(16, seed=1),
                          callbacks=[callback], saef_optimizer=opt)
    callback.trainer = trainer
    result = trainer.train()
    evaluation = trainer.evaluate()
    with opt.evaluation_point("x"):
        digest = hashlib.sha256(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes()).hexdigest()
    print(f"saef optimizer: final train loss {result.training_loss:.4f}, eval loss {evaluation['eval_loss']:.4f}; "
          f"sent {opt.bits['bits_up'] / 8e3:.1f} kB per worker up in {opt.rounds} rounds; x {digest[:16]}", flush=True)


if __name__ == "__main__":
    main()
