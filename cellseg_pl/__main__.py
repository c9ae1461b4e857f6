"""Entry point: ``python -m cellseg_pl <command> ...``.

Training commands go through LightningCLI (``fit``, ``validate``, ``test``; see :mod:`cellseg_pl.cli`); the others
are plain functions with their own flags (``convert``, ...). ``predict`` is the folder tool
(:mod:`cellseg_pl.predict`), or LightningCLI's parsing of a run's configuration when given ``--config``,
``--ckpt_path`` or ``--data.``/``--model.``/``--trainer.`` flags (:func:`lightning_style_predict`); both run
:func:`cellseg_pl.predict.predict_folder`.
This is the only place that configures logging and the process environment.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _convert(argv: list[str]) -> int:
    from cellseg_pl.convert import main

    return main(argv)


#: Non-Lightning sub-commands: name -> (function(argv) -> exit code, one-line help).
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "convert": (_convert, "CVAT 'COCO 1.0' export zip -> YOLO-seg data set (dataset.yaml, images/, labels/)"),
    "export": (
        lambda argv: __import__("cellseg_pl.export", fromlist=["main"]).main(argv),  # imported only when run
        "trained run (.ckpt) -> Ultralytics .pt model file (never replaces an existing file)",
    ),
    "select": (
        lambda argv: __import__("cellseg_pl.select", fromlist=["main"]).main(argv),  # imported only when run
        "active learning: rank unlabelled images by model uncertainty, list/copy/pre-annotate the k most uncertain",
    ),
    "predict": (
        lambda argv: __import__("cellseg_pl.predict", fromlist=["main"]).main(argv),  # imported only when run
        "weights + images -> COCO 1.0 JSON for CVAT (predict --help); with --config/--ckpt_path (LightningCLI\n"
        "             style) from a run's configuration: the same engine and JSON",
    ),
}

#: ``predict`` arguments that only the LightningCLI style has (a run's configuration): with any of them (and no
#: ``--images``), ``predict`` is parsed by LightningCLI; otherwise it is the folder tool, ``--help`` included.
LIGHTNING_PREDICT_FLAGS = ("--config", "-c", "--ckpt_path", "--print_config", "--predictions", "--project", "--name")
LIGHTNING_PREDICT_PREFIXES = ("--data.", "--model.", "--trainer.", "--seed_everything")


def lightning_style_predict(args: list[str]) -> bool:
    """Whether ``predict args`` asks for LightningCLI's parsing (``--config``, ``--ckpt_path``, ``--data.*``...)."""
    names = [a.split("=", 1)[0] for a in args if a.startswith("-")]
    if "--images" in names:
        return False
    return any(n in LIGHTNING_PREDICT_FLAGS or n.startswith(LIGHTNING_PREDICT_PREFIXES) for n in names)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may be replaced, e.g. by a test runner)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # through tqdm, so a line never lands in the middle of a progress bar (the bar is redrawn below it)
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_environment() -> None:
    """Keep Ultralytics offline and quiet, and send our library logs to stderr."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no online checks, no downloads
    os.environ.setdefault("YOLO_VERBOSE", "False")
    pkg = logging.getLogger("cellseg_pl")
    if not any(isinstance(h, _StderrHandler) for h in pkg.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    for message in (
        r".*module\(s\) in eval mode at the start of training.*",  # the weight EMA is never trained, by design
        r".*overridden `on_after_batch_transfer` in `LightningModule`.*",
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def _usage() -> str:
    lines = ["usage: python -m cellseg_pl <command> [options]", "", "training (LightningCLI; --help on each):"]
    lines += [f"  {c}" for c in LIGHTNING_COMMANDS]
    lines += ["", "tools:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_environment()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    # ``predict`` is the CVAT prediction tool unless it is given a run's configuration in LightningCLI's style
    if argv[0] in COMMANDS and (argv[0] != "predict" or not lightning_style_predict(argv[1:])):
        return COMMANDS[argv[0]][0](argv[1:])

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cellseg_pl.cli import CellSegCLI, UsageError
    from cellseg_pl.dataset import DatasetError
    from cellseg_pl.model import ModelError

    try:
        CellSegCLI(args=None if from_sys else argv)
    except (UsageError, DatasetError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if not str(e).startswith("--"):  # our checks name the flag first (e.g. the data module's --data.imgsz)
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SIGTERMException:
        print("stopped by SIGTERM; weights/last.ckpt holds the state: resume with --ckpt_path last", file=sys.stderr)
        return 128 + 15
    return 0


if __name__ == "__main__":
    sys.exit(main())
