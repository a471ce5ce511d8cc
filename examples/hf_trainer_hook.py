"""saef's compression inside Hugging Face's Trainer, through the DDP communication hook.

    torchrun --nproc_per_node 2 examples/hf_trainer_hook.py

The Trainer wraps the model in DistributedDataParallel when it runs under torchrun; a callback registers
saef's hook on that wrapper before the first step. Your optimizer stays the Trainer's (AdamW); what DDP
exchanges becomes top-k 1 % with error feedback. The parameters always hold the model, so the Trainer's
evaluation and checkpoints need nothing more. (A tiny GPT-2 built from a config, on random tokens: seconds.)
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import saef


class SaefCommHook(TrainerCallback):
    """Registers saef.comm_hook on the Trainer's DDP model when training begins."""

    def __init__(self, state):
        self.state, self.trainer = state, None

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(self.state, saef.comm_hook)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, samples=64, length=16, vocabulary=64):
        self.tokens = torch.randint(0, vocabulary, (samples, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir="runs/hf_trainer_hook", per_device_train_batch_size=8, max_steps=6, logging_steps=3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    hook = SaefCommHook(saef.CommHookState(compressor="topk:0.01", method="ef", module=model))
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[hook])
    hook.trainer = trainer
    result = trainer.train()
    print(f"saef hook: final train loss {result.training_loss:.4f}; sent {hook.state.bits['bits_up'] / 8e3:.1f} kB per "
          f"worker up, {hook.state.bits['bits_down'] / 8e3:.1f} kB down", flush=True)


if __name__ == "__main__":
    main()
