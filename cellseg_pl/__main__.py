"""Entry point: ``python -m cellseg_pl <command> ...``.

Training commands go through LightningCLI (``fit``, ``validate``, ``test``; :mod:`cellseg_pl.train.cli`); the tools
(``convert``, ``export``, ``select``, ``predict``, ``evaluate``, ``cycle init|next|learn|status``) are plain functions
whose signatures are their command lines (:mod:`cellseg_pl.commands`).

This is the only place that configures logging and the process environment, and the one place errors become an
exit code (:func:`cellseg_pl.errors.error_line`): a bad argument or input is one ``error: ...`` line on stderr and
exit code 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from cellseg_pl.commands import TOOLS, lightning_style_predict, run_tool
from cellseg_pl.errors import report_error
from cellseg_pl.help_cache import cached_help, is_plain_help

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


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
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check against PyPI
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
    lines += ["  val        = validate; `val --model.model run/weights/best.pt` alone takes data= from the file"]
    lines += ["", "tools (--help on each):"]
    lines += [f"  {name:<12} {tool.help}" for name, tool in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one command; returns the process exit code.

    Args:
        argv: the command and its arguments; default ``sys.argv[1:]``.
        prog: how the user typed the tool (``convert_coco_to_yolo.py``): ``--help`` names it so.
    """
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_environment()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if is_plain_help(argv):  # the text only changes with the code: printed at once after its first run
        return cached_help(argv, prog, lambda: _run(argv, prog, from_sys))
    return _run(argv, prog, from_sys)


def _run(argv: list[str], prog: str | None, from_sys: bool) -> int:
    """The command ``argv[0]`` (``from_sys``: LightningCLI may read ``sys.argv`` itself)."""
    if argv[0] == "cycle":  # two words: cycle init|next|learn|status
        sub = f"cycle {argv[1]}" if len(argv) > 1 else ""
        if sub not in TOOLS:
            subs = "|".join(name.split()[1] for name in TOOLS if name.startswith("cycle "))
            print(f"usage: python -m cellseg_pl cycle {{{subs}}} [options] (--help on each)", file=sys.stderr)
            return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
        return run_tool(sub, argv[2:], prog)
    # ``predict`` is the CVAT prediction tool unless it is given a run's configuration in LightningCLI's style
    if argv[0] in TOOLS and (argv[0] != "predict" or not lightning_style_predict(argv[1:])):
        return run_tool(argv[0], argv[1:], prog)

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cellseg_pl.train.cli import CellSegCLI, data_from_weights

    if argv[0] == "val":  # Ultralytics' name for it
        argv[0], from_sys = "validate", False
    try:
        if argv[0] in ("validate", "test"):
            given = argv
            argv = [argv[0], *data_from_weights(argv[1:])]
            from_sys = from_sys and argv == given
        CellSegCLI(args=None if from_sys else argv)
    except SIGTERMException:
        print("stopped by SIGTERM; weights/last.ckpt holds the state: resume with --ckpt_path last", file=sys.stderr)
        return 128 + 15
    except (ValueError, FloatingPointError) as err:
        return report_error(err)
    except OSError as err:  # a run folder that cannot be written: one line naming the file (one without: a bug)
        if not err.filename:
            raise
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
