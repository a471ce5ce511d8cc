"""The ``saef`` command line.

    saef train                                   # the default: SAEF, top-k 1 %, K = 4, MNIST-1D, 1-D CNN
    saef train --method sgd --compressor identity   # the full-precision baseline
    saef train --config run.toml --lr 0.05       # a TOML file; flags override it
    saef plot runs/a runs/b -o compare.png       # overlay runs
    saef reproduce table1 fig1 fig3 --jobs 2     # the paper's experiments (see saef reproduce --help)

Exit codes: 0 success, 1 the run failed while training, 2 bad input (config, flags, missing data).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

from .config import ConfigError, TrainConfig, load_config, resume_config, train_methods

__all__ = ["main"]

HELP = {
    "method": f"{', '.join(train_methods())} (sgd = full-precision momentum SGD baseline; ef21 = EF21-SGDM with "
              "an EF21-P downlink; direct = compressed SGD without feedback)",
    "compressor": "identity, sign, topk:RHO, randk:RHO[:unbiased], qsgd:S, natural or powersgd:R, any that sends "
                  "floats with :bf16 or :fp16 for 16-bit values (default topk:0.01; identity for sgd)",
    "server_compressor": "the server's compressor in double-way mode (default: the workers')",
    "workers": "number of workers K",
    "double_way": "compress what the server sends back (--single-way: send the dense average)",
    "average_every": "error-averaging period p in steps, or 'never' (ef and saef only)",
    "warmup_steps": "the first N steps exchange dense fp32 values both ways (counted), then the compressors take over",
    "optimizer": "the local optimizer: sgd (momentum SGD) or adam (compressed-momentum Adam: 1-bit Adam with ef, "
                 "SAEF-Adam with saef; no bias correction, v frozen after --warmup-steps); with --method sgd, the "
                 "optimizer's full-precision baseline",
    "momentum": "momentum mu in [0, 1) (optimizer sgd)",
    "betas": "optimizer adam: b1,b2, each in [0, 1) (default 0.9,0.999)",
    "eps": "optimizer adam: eps > 0 added to sqrt(v) (default 1e-8)",
    "weight_decay": "weight decay (sgd: added to the gradient; adam: decoupled, x <- x - lr wd x)",
    "lr": "learning rate",
    "lr_milestones": "comma-separated epochs after which the lr is multiplied by --lr-decay",
    "lr_decay": "learning-rate decay factor at each milestone",
    "epochs": "number of epochs",
    "batch_size": "global batch size (divisible by workers)",
    "seed": "random seed (model init, data order, augmentation, random compressors' draws)",
    "dataset": "mnist1d, digits, cifar10, cifar100, imagenet, synthetic, libsvm (with --data-file) or text (bytes of "
               "Python's standard library .py files; with model gpt)",
    "dataset_size": "samples to generate (mnist1d) or keep (others); text: bytes of the corpus (default 2000000)",
    "data_file": "libsvm: the LIBSVM/svmlight file to train on (labels -1/+1 or 0/1); text: a text file to model "
                 "instead of the standard library's .py files",
    "test_file": "libsvm: a file to test on (default: the training file, so the metrics are the objective's)",
    "holdout": "the last N training samples are not trained on but evaluated each epoch (val_loss, val_acc), "
               "to choose hyperparameters without looking at the test set",
    "full_batch": "each worker takes its whole contiguous shard every step (gradient descent; one step an epoch); "
                  "adds ||grad f(x)||^2 on the training set to the metrics",
    "data_dir": "folder holding the datasets (MNIST-1D is generated and cached there)",
    "model": "mlp, mlp5m, cnn1d, resnet20/32/44/56, resnet50, logreg (binary, non-convex regulariser), gpt "
             "(byte-level transformer, with dataset text)",
    "gpt_layers": "model gpt: transformer blocks",
    "gpt_width": "model gpt: width (a multiple of --gpt-heads)",
    "gpt_heads": "model gpt: attention heads",
    "context": "dataset text / model gpt: bytes per sample, the model's context",
    "precision": "fp32, or bf16: forward and backward under autocast; parameters, momentum and errors stay fp32",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "backend": "sim (K workers in this process) or dist (one worker per torch.distributed rank)",
    "server": "dist only: sharded (each rank serves a share of the layers) or rank0",
    "overlap": "dist only: compress and send each bucket of layers while backward makes the next (same results)",
    "bucket_mb": "dist only, with --overlap: the most MB of gradients in one bucket",
    "timeout": "dist only: seconds any wait on another rank (the rendezvous included) may take before failing; finite",
    "checkpoint_every": "also checkpoint every N steps (0: only at the end of each epoch)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "max_nonfinite_skips": "steps with a NaN/Inf loss or gradient are skipped; stop after this many in a row (0: at once)",
    "output": "run directory (default: runs/<dataset>-<model>-<method>-...-<time>)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other input error
        self.exit(2, f"saef: error: {message}\n")


def _average_every(text: str):
    if text == "never":
        return "never"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'never', got {text!r}") from None


def _numbers(text: str) -> List[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _milestones(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="saef", description="Distributed training with compressed communication and step-ahead error feedback.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train a model (defaults: SAEF, top-k 1%%, K=4, MNIST-1D)")
    train.add_argument("--config", help="TOML file with any of the keys below; flags override it")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest checkpoint (its config; flags may change "
                       "epochs, lr and other settings that do not invalidate the saved state)")
    train.add_argument("--reset-errors", action="store_true", help="with --resume: start momentum and errors from zero, which "
                       "allows another number of workers, method or compressor (logged in the records)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "double_way":
            group = train.add_mutually_exclusive_group()
            group.add_argument("--double-way", dest="double_way", action="store_const", const=True, help=HELP["double_way"])
            group.add_argument("--single-way", dest="double_way", action="store_const", const=False)
            continue
        if field.type == "bool":  # an on/off switch (default off)
            train.add_argument(flag, action="store_const", const=True, default=None, help=HELP[field.name])
            continue
        kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float, "List[int]": _milestones,
                "Optional[List[float]]": _numbers}.get(field.type, str)
        if field.name == "average_every":
            kind = _average_every
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        train.add_argument(flag, type=kind, default=None, help=f"{HELP[field.name]} (default: {default})")

    commands.add_parser("reproduce", help="the paper's experiments (table1, fig1, fig3); see saef reproduce --help", add_help=False)
    plot = commands.add_parser("plot", help="overlay the curves of one or more runs")
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reproduce"]:
        from ..studies.reproduce import main as reproduce

        return reproduce(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "plot":
        return _plot(args)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}  # average_every may be 'never'
    changed = None
    try:
        if args.resume:
            if args.config:
                raise ConfigError("--resume takes the run's own config.json; give changes as flags, not --config")
            saved = _read_saved_config(args.resume)
            overrides["output"] = args.resume
            config, changed = resume_config(saved, overrides, args.reset_errors)
        else:
            if args.reset_errors:
                raise ConfigError("--reset-errors goes with --resume")
            config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"saef: error: {error}", file=sys.stderr)
        return 2
    return _train(config, progress=not args.quiet, resume=bool(args.resume), reset_errors=args.reset_errors, changed=changed)


def _read_saved_config(run_dir: str) -> dict:
    import json
    from pathlib import Path

    if not Path(run_dir).is_dir():
        raise ConfigError(f"--resume needs a run directory made by saef train; {run_dir} is "
                          + ("not a directory" if Path(run_dir).exists() else "missing"))
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: --resume needs a run directory made by saef train") from None
    except (ValueError, OSError) as error:  # (UnicodeDecodeError is a ValueError)
        raise ConfigError(f"{path} cannot be read as JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a config object")
    return saved


def _train(config: TrainConfig, progress: bool, resume: bool = False, reset_errors: bool = False, changed=None) -> int:
    from .checkpoint import CheckpointError
    from .loop import TrainingFailed, train

    try:
        train(config, progress=progress, resume=resume, reset_errors=reset_errors, changed=changed)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, ImportError, CheckpointError) as error:
        print(f"saef: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saef: interrupted; the run directory is incomplete (no summary.json)", file=sys.stderr)
        return 130
    except FloatingPointError as error:
        print(f"saef: error: {error}", file=sys.stderr)
        return 1
    except TrainingFailed as error:  # the job failed under us (a peer died, a wait timed out)
        print(f"saef: error: {error}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Threads of the failed job may still sit in torch's C++ (a rendezvous, a collective); the
        # interpreter's teardown would tear them down mid-call and abort the process. Leave without it.
        os._exit(1)
    except OSError as error:  # e.g. the disk is full: the last complete checkpoint and records stay valid
        print(f"saef: error: could not write the run's files: {error}; the newest complete checkpoint is intact "
              "(resume with --resume once there is room)", file=sys.stderr)
        return 1
    return 0


def _plot(args) -> int:
    from .plots import plot_runs

    from pathlib import Path

    if Path(args.output).is_dir():
        print(f"saef: error: -o {args.output} is a directory; give the PNG file to write", file=sys.stderr)
        return 2
    try:
        path = plot_runs(args.runs, args.output)
    except (FileNotFoundError, ValueError) as error:
        print(f"saef: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the figure could not be written (permissions, a full disk): nothing half-written is left
        print(f"saef: error: could not write {args.output}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(f"saef: wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
