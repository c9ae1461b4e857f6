"""Entry point: ``python -m cellseg_pl <command> ...``.

Training commands go through LightningCLI (``fit``, ``validate``, ``test``; see :mod:`cellseg_pl.cli`). The tools
(:data:`TOOLS`: ``convert``, ``export``, ``select``, ``predict``) are plain functions whose typed, documented
signatures are their command lines (jsonargparse, as litgpt's ``__main__``): ``--help`` is generated from the
docstrings, each flag may be spelled with dashes or underscores (``--images-dir`` = ``--images_dir``), a ``bool``
argument is a switch (``--overwrite``; ``--no_tta`` for one that defaults to true). ``predict`` is the folder tool
(:func:`cellseg_pl.predict.predict_folder`), or LightningCLI's parsing of a run's configuration when given
``--config``, ``--ckpt_path`` or ``--data.``/``--model.``/``--trainer.`` flags (:func:`lightning_style_predict`);
both run :func:`~cellseg_pl.predict.predict_folder`.

This is the only place that configures logging and the process environment, and the one place errors become an
exit code (:func:`error_line`): a bad argument or input is one ``error: ...`` line on stderr and exit code 2, no
traceback.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
import textwrap
import warnings
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Any, Callable

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


@dataclass(frozen=True)
class Tool:
    """A sub-command that is a plain function: its signature and docstring are the command line."""

    function: str
    """``module:function``, imported only when the command runs."""
    help: str
    """One line: the overview of ``python -m cellseg_pl --help`` and the description of ``<command> --help``."""
    output: str
    """The argument naming what the command writes: the path of an ``OSError`` without a file name."""
    inference: bool = False
    """Whether it takes :class:`cellseg_pl.inference.InferenceOptions`' flags (``--conf``, ``--tile``, ...)."""
    skip: tuple[str, ...] = ()
    """Arguments of the function that are no flags (library use only)."""
    epilog: str = ""
    """Text after the flags in ``--help``."""
    report: Callable[[Any, dict[str, Any]], str] = lambda result, args: result.format()
    """What is printed on success, from the function's result and arguments."""

    def load(self) -> Callable[..., Any]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


#: ``predict --help``: how to predict from a run's configuration instead (LightningCLI style).
LIGHTNING_STYLE_HELP = """\
from a run's configuration instead (LightningCLI style; the same engine, tiling and JSON):
  python -m cellseg_pl predict --config RUN/config.yaml --ckpt_path RUN/weights/best.ckpt \\
      --data.predict_images DIR [--predictions FILE] [--model.predict_conf 0.25] [--model.min_area 500] \\
      [--tile auto|on|off] [--tile_overlap PX] [--save_overlays DIR]
  (--config, --ckpt_path or any --data./--model./--trainer. flag selects it; the thresholds are the run's
  --model.predict_conf/iou/max_det/min_area, the input size --data.imgsz; default output
  <project>/<name>/predictions.json, never replaced; all its options: predict --config RUN/config.yaml --help)"""

#: The tools: name -> :class:`Tool`.
TOOLS: dict[str, Tool] = {
    "convert": Tool(
        "cellseg_pl.convert:convert_coco_zip",
        "CVAT 'COCO 1.0' export zip -> YOLO-seg data set (dataset.yaml, images/, labels/)",
        output="output_dir",
    ),
    "export": Tool(
        "cellseg_pl.export:export_model",
        "trained run (.ckpt) -> Ultralytics .pt model file (never replaces an existing file)",
        output="output",
        report=lambda path, args: f"exported {args['ckpt']} -> {path}",
    ),
    "select": Tool(
        "cellseg_pl.select:select_images",
        "active learning: rank unlabelled images by model uncertainty, list/copy/pre-annotate the k most uncertain",
        output="output",
        inference=True,
        skip=("weights",),
    ),
    "predict": Tool(
        "cellseg_pl.predict:predict_folder",
        "weights + images -> COCO 1.0 JSON for CVAT; with --config/--ckpt_path (LightningCLI style) from a run's\n"
        "             configuration: the same engine and JSON",
        output="output",
        inference=True,
        epilog=LIGHTNING_STYLE_HELP,
    ),
}

#: Said in every tool's ``--help`` (:func:`_normalize` makes it true).
_SPELLING = "Flags may be spelled with dashes or underscores (--output-dir = --output_dir)."
#: Arguments typed ``str | Path | nn.Module`` (a network for library callers): a file name on the command line.
_FILE_ONLY = ("model",)


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


def _flag_value(args: list[str], *flags: str) -> str | None:
    """The value of the last of ``flags`` in ``args`` (``--flag value`` or ``--flag=value``), or None."""
    value = None
    for i, arg in enumerate(args):
        name, eq, rest = arg.partition("=")
        if name in flags:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def data_from_weights(args: list[str]) -> list[str]:
    """``validate``/``test`` of an Ultralytics ``.pt`` alone: its data set (and imgsz) from the file's ``train_args``.

    As ``yolo segment val model=best.pt`` does: when ``--model.model`` names a ``.pt`` and neither
    ``--data.dataset`` nor a ``--config`` is given, the file's recorded ``data`` (``weights/best.pt`` of a run
    records its absolute path) becomes ``--data.dataset``, and its ``imgsz`` ``--data.imgsz`` unless given.
    """
    weights = _flag_value(args, "--model.model")
    if not weights or not weights.endswith(".pt") or _flag_value(args, "--data.dataset", "--config", "-c"):
        return args
    from cellseg_pl.model import load_ultralytics_checkpoint

    train_args = load_ultralytics_checkpoint(weights, "--model.model").get("train_args") or {}
    data = train_args.get("data")
    if not data or not Path(str(data)).is_file():
        recorded = f"records data={data}, which does not exist here" if data else "records no data set"
        raise ValueError(f"--model.model: {weights} {recorded}; pass --data.dataset path/to/dataset.yaml")
    extra = ["--data.dataset", str(data)]
    if train_args.get("imgsz") and _flag_value(args, "--data.imgsz") is None:
        extra += ["--data.imgsz", str(int(train_args["imgsz"]))]
    logging.getLogger(__name__).info("--model.model %s: data set %s from the file's train_args", weights, data)
    return args + extra


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
    lines += ["  val        = validate; `val --model.model run/weights/best.pt` alone takes data= from the file"]
    lines += ["", "tools (--help on each):"]
    lines += [f"  {name:<10} {tool.help}" for name, tool in TOOLS.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the tools


def _flags(tool: Tool, function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The function's arguments that are flags (with the inference options when it takes them), by name."""
    params = {n: p for n, p in inspect.signature(function).parameters.items() if n not in tool.skip}
    if tool.inference:
        from cellseg_pl.inference import InferenceOptions

        params.update(inspect.signature(InferenceOptions).parameters)
    return params


def tool_parser(name: str, prog: str | None = None):  # -> jsonargparse.ArgumentParser
    """The command line of tool ``name``, generated from its function's signature and docstring.

    Args:
        name: a key of :data:`TOOLS`.
        prog: the command as the user typed it (``--help``'s usage line); default ``python -m cellseg_pl <name>``.
    """
    from docstring_parser import parse as parse_docstring
    from jsonargparse import ActionYesNo, ArgumentParser, DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # the epilog keeps its lines
            return "".join(indent + line for line in text.splitlines(keepends=True))

    class Parser(ArgumentParser):
        def add_argument(self, *args: Any, **kwargs: Any):  # noqa: ANN201
            if kwargs.get("type") is bool and args[0].startswith("--"):  # a switch: --overwrite / --no_overwrite
                kwargs.pop("type")
                kwargs["action"] = ActionYesNo(no_prefix="no_")
            return super().add_argument(*args, **kwargs)

    tool = TOOLS[name]
    function = tool.load()
    description = textwrap.fill(f"{' '.join(tool.help.split())}. {_SPELLING}", 100)
    parser = Parser(
        prog=prog or f"python -m cellseg_pl {name}", description=description, epilog=tool.epilog or None,
        formatter_class=Formatter, exit_on_error=False,
    )  # fmt: skip
    file_only = [n for n in _FILE_ONLY if n in inspect.signature(function).parameters]
    inference = set()
    if tool.inference:
        from cellseg_pl.inference import InferenceOptions

        inference = {f.name for f in fields(InferenceOptions)}
    docs = {p.arg_name: p.description for p in parse_docstring(function.__doc__ or "").params}
    for arg in file_only:
        parser.add_argument(f"--{arg}", type=str, required=True, help=" ".join((docs.get(arg) or "").split()))
    parser.add_function_arguments(function, as_group=False, skip={*tool.skip, *file_only, *inference})
    if tool.inference:
        parser.add_class_arguments(InferenceOptions, as_group=False)
    return parser


def _normalize(argv: list[str], params: dict[str, inspect.Parameter]) -> list[str]:
    """The documented spellings as jsonargparse reads them: ``--images-dir`` -> ``--images_dir``, ``--no-tta`` ->
    ``--no_tta``; a repeated list flag (``--exclude a --exclude b``) appends (``--exclude+``)."""
    names = set(params) | {f"no_{n}" for n, p in params.items() if str(p.annotation) == "bool"}
    lists = {n for n, p in params.items() if str(p.annotation).startswith("list[")}
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            if key.replace("-", "_") in names:
                key = key.replace("-", "_")
            arg = f"--{key}{'+' if key in lists else ''}{eq}{value}"
        out.append(arg)
    return out


def _parse_error(message: str, params: dict[str, inspect.Parameter]) -> str:
    """jsonargparse's wording of a bad command line, in one line that names the flags."""
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [n.strip() for n in required[1].split(",")]
        return "the following arguments are required: " + ", ".join(f"--{n}" for n in names)
    bad_value = re.match(r'Parser key "([^"]+)":.*(?:Got|Given) value: (.*?)\s*$', message, re.DOTALL)
    if bad_value:
        key, value = bad_value[1], bad_value[2]
        return f"--{key}: expected {params[key].annotation if key in params else 'another value'}, got {value!r}"
    return " ".join(message.split())


def run_tool(name: str, argv: list[str], prog: str | None = None) -> int:
    """Parse ``argv`` for tool ``name``, call its function and print its report.

    Returns:
        0 on success (``--help`` included); 2 on a bad argument or input, reported as one ``error: ...`` line.
    """
    from jsonargparse import ArgumentError

    tool = TOOLS[name]
    parser = tool_parser(name, prog)
    params = _flags(tool, tool.load())
    try:
        args = parser.parse_args(_normalize(argv, params)).as_dict()
    except ArgumentError as err:
        print(f"error: {_parse_error(str(err), params)} (see {parser.prog} --help)", file=sys.stderr)
        return 2
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    try:
        result = tool.load()(**args)
    except Exception as err:  # noqa: BLE001 - error_line re-raises what is not a usage error
        return _report_error(err, args, tool.output)
    print(tool.report(result, args))
    return 0


# ---------------------------------------------------------------------------------------------- errors

#: Errors that are the user's to fix: (module, class); each message names the flag or file and the fix.
_USAGE_ERRORS = (
    ("cellseg_pl.coco", "CocoError"), ("cellseg_pl.dataset", "DatasetError"), ("cellseg_pl.model", "ModelError"),
    ("cellseg_pl.export", "ExportError"), ("cellseg_pl.cli", "UsageError"),
)  # fmt: skip


def error_line(err: BaseException, args: dict[str, Any] | None = None, output: str | None = None) -> tuple[str, int]:
    """The one line (without ``error: ``) and exit code an exception becomes; re-raises one that is a bug.

    Args:
        err: the exception a command raised.
        args: the tool's arguments (``--device`` of an out-of-memory error); None for the LightningCLI commands.
        output: the argument naming what the tool writes: where an ``OSError`` without a file name happened (only
            tools report ``OSError``; LightningCLI commands let it through).
    """
    # an error class can only be raised once its module is loaded: nothing is imported on the error path
    usage = tuple(getattr(sys.modules[m], c) for m, c in _USAGE_ERRORS if m in sys.modules)
    torch = sys.modules.get("torch")
    if isinstance(err, usage) or (isinstance(err, ValueError) and str(err).startswith("--")):
        return str(err), 2  # our checks name the flag first (e.g. the data module's --data.imgsz)
    if isinstance(err, FloatingPointError):
        return str(err), 1
    if args is not None and torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return f"--device {args.get('device')}: out of GPU memory; lower --batch-size or --imgsz", 2
    if output is not None and isinstance(err, OSError):
        where = args.get(output) if args else output
        if err.filename and not os.path.basename(str(err.filename)).startswith("."):  # hidden: our staging names
            where = err.filename
        return f"{where}: {err.strerror or err}; check the path, permissions and free space", 2
    raise err


def _report_error(err: BaseException, args: dict[str, Any] | None = None, output: str | None = None) -> int:
    line, code = error_line(err, args, output)
    print(f"error: {line}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------- main


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
    # ``predict`` is the CVAT prediction tool unless it is given a run's configuration in LightningCLI's style
    if argv[0] in TOOLS and (argv[0] != "predict" or not lightning_style_predict(argv[1:])):
        return run_tool(argv[0], argv[1:], prog)

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cellseg_pl.cli import CellSegCLI

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
        return _report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
