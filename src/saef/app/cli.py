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
import os
import sys
from typing import List, Optional

from . import schema
from .config import ConfigError, TrainConfig, load_config, resume_config

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other input error
        self.exit(2, f"saef: error: {message}\n")


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
    schema.add_flags(train, TrainConfig)  # one flag per declared key, with its help line and default

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
    overrides = schema.flag_values(args, TrainConfig)  # (average_every may be 'never')
    changed = None
    try:
        if args.resume is not None:
            if not args.resume:
                raise ConfigError("--resume needs the run directory to continue (an empty name was given)")
            if args.config:
                raise ConfigError("--resume takes the run's own config.json; give changes as flags, not --config")
            if overrides.get("output") is not None and os.path.abspath(overrides["output"]) != os.path.abspath(args.resume):
                raise ConfigError(f"--output {overrides['output']} with --resume {args.resume}: a resumed run continues in "
                                  "its own directory; leave --output out")
            saved = _read_saved_config(args.resume)
            overrides["output"] = args.resume
            config, changed = resume_config(saved, overrides, args.reset_errors)
        else:
            if args.reset_errors:
                raise ConfigError("--reset-errors goes with --resume")
            applied = {}
            config = load_config(args.config, overrides, model_defaults=applied)
            if applied and not args.quiet:
                print(f"saef: defaults of model {config.model}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items())
                      + " (give any of them to choose another)")
    except ConfigError as error:
        print(f"saef: error: {error}", file=sys.stderr)
        return 2
    return _train(config, progress=not args.quiet, resume=args.resume is not None, reset_errors=args.reset_errors, changed=changed)


CONFIG_LIMIT = 16 << 20  # bytes of a run's config.json read on --resume


def _read_saved_config(run_dir: str) -> dict:
    from pathlib import Path

    from ..files import parse_json, read_inside

    shared = (" (every process of the job must see it: give --output a path on storage every host shares)"
              if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "")
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--resume needs a run directory made by saef train; {run_dir} is "
                          + ("not a directory" if Path(run_dir).exists() else "missing") + shared)
    path = Path(run_dir) / "config.json"
    try:  # a regular file in the run directory, not a link out of it, and bounded (saef.files)
        saved = parse_json(read_inside(Path(run_dir).resolve(), "config.json", CONFIG_LIMIT), path)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: --resume needs a run directory made by saef train{shared}") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"{path} cannot be read ({error.strerror or error})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a config object")
    return saved


def _train(config: TrainConfig, progress: bool, resume: bool = False, reset_errors: bool = False, changed=None) -> int:
    from .checkpoint import CheckpointError
    from .loop import TrainingFailed, WriteFailed, train

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
    except WriteFailed as error:  # e.g. the disk is full: the message says which checkpoint is left
        print(f"saef: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # before the run began (its directory could not be made)
        print(f"saef: error: could not write the run's files: {error}", file=sys.stderr)
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
