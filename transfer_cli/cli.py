"""`transfer <command> [overrides]`: dispatch to a command, and the one place errors become exit codes.

`transfer --help` must stay fast, so nothing here imports torch at module level: a command's
module is imported when it runs. A user mistake (TransferError) is one line and exit 2, a
Ctrl-C outside training 130, anything else a bug: one line naming it and exit 1.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

from transfer_cli.core.errors import INTERRUPT_EXIT, TransferError, failure, report_user_error


USAGE = """usage: transfer <command> [options] [key=value overrides]

Image transfer learning experiments, configured with Hydra.

commands:
  train     train a backbone with a strategy; writes a run directory under outputs/
            (`transfer train --help` lists the config groups and their options;
             `transfer train -m strategy=a,b` sweeps)
  resume    continue an interrupted run in its own directory (`transfer resume RUN_DIR`)
  lr-find   the learning-rate range test on a run's first stage: the suggested lr, a curve, no training
            (`transfer lr-find [--steps N] [key=value ...]`)
  report    compare run dirs: results.md, results.csv, epochs.md, val_acc.png (`transfer report DIR...`)
  eval      per-class accuracy, macro-F1, confusion matrix of a run (`transfer eval RUN_DIR [key=value]`)
  predict   top-k classes of images or folders with a run's model (`transfer predict RUN_DIR PATH...`)
  export    the run's network for inference: TorchScript, ONNX or safetensors, with model.json
            (`transfer export RUN_DIR [--format onnx]`)
  exercise  the lesson's exercise 5: ImageNet normalization vs none vs 0.5 (`transfer exercise normalization`)
  bench     benchmarks -> outputs/bench/bench.json and a table (`transfer bench [--quick] [--gpu] [--check]`)

examples:
  transfer train experiment=smoke
  transfer train strategy=gradual backbone=resnet18 dataset=folder dataset.root=~/images
  transfer train -m experiment=smoke strategy=feature_extract,fine_tune
"""


# each command is transfer_cli.commands.<module>.main(argv) -> exit code, imported only when it runs
COMMANDS = {"train": "train", "report": "report", "resume": "resume", "eval": "eval", "predict": "predict",
            "export": "export", "exercise": "exercise", "bench": "bench", "lr-find": "lr_find"}


# commands whose first argument is a run directory: completed from the runs under outputs/
RUN_DIR_COMMANDS = {"resume", "eval", "predict", "export"}


def _completion_query(argv: list[str]) -> list[str] | None:
    """What `eval "$(transfer train -sc install=bash)"` (or zsh) installs calls `transfer -sc query=bash` with the
    line typed so far in COMP_LINE. The first word completes to a command, a RUN_DIR argument to the run
    directories under outputs/ (printed here: None returned); Hydra answers the rest of a train line once the
    word `train` is out of it. Anything else gets no words, and the shell falls back to file names."""
    if not any(arg.startswith("query=") for arg in argv[1:]):
        return argv  # install=, uninstall=: Hydra's
    line = os.environ.get("COMP_LINE", "")
    typed = line[:int(os.environ.get("COMP_POINT", len(line)))]
    program, _, rest = line.partition(" ")
    words = typed.split()[1:] + ([""] if typed[-1:].isspace() or len(typed.split()) < 2 else [])  # the last: typing
    if len(words) == 1:
        print(" ".join(name for name in COMMANDS if name.startswith(words[0])))
        return None
    if words[0] == "train":
        cut = len(program) + len(" train")
        os.environ["COMP_LINE"] = program + line[cut:]
        os.environ["COMP_POINT"] = str(max(len(program), int(os.environ.get("COMP_POINT", len(line))) - len(" train")))
        return argv
    if words[0] in RUN_DIR_COMMANDS and not [word for word in words[1:-1] if not word.startswith("-")]:
        from transfer_cli.runs.report_runs import run_dirs_under

        print(" ".join(str(run) for run in run_dirs_under(Path("outputs")) if str(run).startswith(words[-1])))
    return None


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """warnings.formatwarning for the CLI: a library's warning as one line, without Python's default second line
    (the library's own source line, which says nothing to a user)."""
    return f"transfer: warning: {' '.join(str(message).split())} ({category.__name__})\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `transfer` console script."""
    warnings.formatwarning = one_line_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in {"-V", "--version"}:
        from transfer_cli import __version__
        print(f"transfer {__version__}")
        return 0
    if argv[0] in {"-sc", "--shell-completion"}:
        query = _completion_query(argv)
        if query is None:
            return 0
        argv = ["train", *query]
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"transfer: unknown command '{argv[0]}'{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(f"transfer_cli.commands.{command}").main(argv[1:])
    except TransferError as error:
        return report_user_error(error)
    except BrokenPipeError:  # `transfer train --help | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail on the closed pipe again
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        print("transfer: interrupted", file=sys.stderr)
        return INTERRUPT_EXIT
    except Exception as error:  # noqa: BLE001 - a full disk, or a bug: one line here (a bug's traceback in a file)
        code, line = failure(error, None)
        print(line, file=sys.stderr)
        return code
