"""Every error a user can fix: one base class and one per stage.

A :class:`CellSegError` says which flag or file is wrong, what is wrong with it and what to do, in one line; the
command line (:mod:`cellseg_pl.__main__`) prints any of them as ``error: <message>`` with exit code 2 and no
traceback. Anything else that escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


class CellSegError(ValueError):
    """A problem with an argument or an input that the user can fix.

    Built from a whole message (``CellSegError("--data.imgsz: 33 is not a multiple of 32")``), or from its three
    parts, worded ``"<where>: <problem>; <what to do>"``.

    Args:
        where: the message, or the flag or file it is about.
        problem: what is wrong (with ``where`` the flag or file).
        hint: what to do about it.
    """

    def __init__(self, where: str | Path, problem: str | None = None, hint: str = "") -> None:
        self.where, self.problem, self.hint = str(where), problem, hint
        message = str(where) if problem is None else f"{where}: {problem}" + (f"; {hint}" if hint else "")
        super().__init__(message)


class UsageError(CellSegError):
    """A command-line flag or value that cannot work (a bad number, an option the machine cannot run)."""


class YoloArgError(UsageError):
    """A ``yolo segment train`` argument that is unknown, unsupported or malformed."""


class DatasetError(CellSegError):
    """A data set on disk that stops training: ``dataset.yaml``, an image or a label file."""


class ImageTooLargeError(DatasetError):
    """An image over the pixel limit (``CV_IO_MAX_IMAGE_PIXELS``, 2^28 px by default; its header is read first): valid,
    not decoded."""


class ModelError(CellSegError):
    """A model file or name that cannot be used (missing, truncated, not a segmentation model, ...)."""


class ConvertError(CellSegError):
    """A CVAT "COCO 1.0" export, or an argument of ``convert``, that cannot be converted."""


class OutputError(CellSegError):
    """An output file or folder a command cannot write, or must not replace."""


class PredictError(CellSegError):
    """A bad argument or input of ``predict`` or ``select``."""


class ExportError(CellSegError):
    """An export that must not happen (the output exists, the weights are not finite, ...)."""


def error_line(err: BaseException, args: dict[str, Any] | None = None, output: str | None = None) -> tuple[str, int]:
    """The one line (without ``error: ``) and exit code an exception becomes; re-raises one that is a bug.

    Args:
        err: the exception a command raised.
        args: the tool's arguments (``--device`` of an out-of-memory error); None for the LightningCLI commands.
        output: the argument naming what the tool writes: where an ``OSError`` without a file name happened (only
            tools report ``OSError``; LightningCLI commands let it through).
    """
    torch = sys.modules.get("torch")  # (only an error of a command that loaded torch can be torch's)
    if isinstance(err, CellSegError):
        return str(err), 2
    if isinstance(err, FloatingPointError):
        return str(err), 1
    if args is not None and torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return f"--device {args.get('device')}: out of GPU memory; lower --batch-size or --imgsz", 2
    if output is None and isinstance(err, OSError) and err.filename:  # a LightningCLI command: the file it names
        return _os_error_line(err, err.filename, None)
    if output is not None and isinstance(err, OSError):
        where = args.get(output) if args else output
        return _os_error_line(err, where, output)
    raise err


def _os_error_line(err: OSError, where: Any, output: str | None) -> tuple[str, int]:
    """An ``OSError`` writing ``where`` (the output argument ``output``'s value, or the file the error names)."""
    blocker = _file_in_the_way(err, where)
    if blocker is not None:
        if output is None:
            return f"{where}: {blocker} is a file, not a folder; choose a path outside it, or move the file away", 2
        flag = f"--{output.replace('_', '-')}"
        return (f"{flag} {where}: {blocker} is a file, not a folder; choose an {flag} outside it, or move the "
                f"file away"), 2
    named = err.filename2 or err.filename  # (a copy names the source first and the file it failed to write second)
    if named and not os.path.basename(str(named)).startswith("."):  # hidden: our staging names
        where = named
    return f"{where}: {err.strerror or err}; check the path, permissions and free space", 2


def _file_in_the_way(err: OSError, output: Any) -> Path | None:
    """The file that stands where a folder of the output's path must be (``mkdir`` then says "File exists",
    ``open`` "Not a directory"), or None."""
    if not isinstance(err, (FileExistsError, NotADirectoryError)) or not output:
        return None
    for folder in Path(str(output)).parents:
        if folder.exists():
            return None if folder.is_dir() else folder
    return None


def report_error(err: BaseException, args: dict[str, Any] | None = None, output: str | None = None) -> int:
    line, code = error_line(err, args, output)
    print(f"error: {line}", file=sys.stderr)
    return code
