"""The tools: sub-commands that are plain functions, whose typed, documented signatures are their command lines.

``convert``, ``export``, ``select``, ``predict``, ``evaluate`` and ``cycle init|next|learn|status`` (:data:`TOOLS`)
are parsed by jsonargparse, as litgpt's
commands are: ``--help`` is generated from the docstrings, each flag may be spelled with dashes or underscores
(``--images-dir`` = ``--images_dir``), a ``bool`` argument is a switch (``--overwrite``; ``--no_tta`` for one that
defaults to true). ``predict`` given a run's configuration (``--config``, ``--ckpt_path``, ``--data.*``...) is parsed by
LightningCLI instead (:func:`lightning_style_predict`); both run :func:`cellseg_pl.infer.predict.predict_folder`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass, fields
from typing import Any, Callable

from cellseg_pl.errors import report_error


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
    """Whether it takes :class:`cellseg_pl.infer.options.InferenceOptions`' flags (``--conf``, ``--tile``, ...)."""
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
      --data.predict_images DIR [--predictions FILE] [--conf 0.25] [--min_area 500] \\
      [--tile auto|on|off] [--tile_overlap PX] [--save_overlays DIR]
  (--config, --ckpt_path or any --data./--model./--trainer. flag selects it; the thresholds are the run's
  --conf/--iou/--max_det/--min_area, as here; the input size --data.imgsz; default output
  <project>/<name>/predictions.json, never replaced; all its options: predict --config RUN/config.yaml --help)"""

#: The tools: name -> :class:`Tool`.
TOOLS: dict[str, Tool] = {
    "convert": Tool(
        "cellseg_pl.cvat.convert:convert_coco_zip",
        "CVAT 'COCO 1.0' export zip -> YOLO-seg data set (dataset.yaml, images/, labels/)",
        output="output_dir",
    ),
    "export": Tool(
        "cellseg_pl.train.export:export_model",
        "trained run (.ckpt) -> Ultralytics .pt model file (never replaces an existing file)",
        output="output",
        report=lambda path, args: f"exported {args['ckpt']} -> {path}",
    ),
    "select": Tool(
        "cellseg_pl.infer.select:select_images",
        "active learning: rank unlabelled images by model uncertainty, list/copy/pre-annotate the k most uncertain",
        output="output",
        inference=True,
        skip=("weights",),
    ),
    "predict": Tool(
        "cellseg_pl.infer.predict:predict_folder",
        "weights + images -> COCO 1.0 JSON for CVAT; with --config/--ckpt_path (LightningCLI style) from a run's\n"
        "               configuration: the same engine and JSON",
        output="output",
        inference=True,
        epilog=LIGHTNING_STYLE_HELP,
    ),
    "evaluate": Tool(
        "cellseg_pl.evaluate:evaluate",
        "score a model (.ckpt or Ultralytics .pt) on a split of a data set: mask mAP, F1, counting error",
        output="output",
        report=lambda result, args: importlib.import_module("cellseg_pl.evaluate").format_result(result),
    ),
    "cycle init": Tool(
        "cellseg_pl.lab.init:cycle_init",
        "the lab's cycle: make a lab folder (the model as v1, a fixed test set, the fine-tuning recipe)",
        output="lab",
    ),
    "cycle next": Tool(
        "cellseg_pl.lab.cycle:cycle_next",
        "the lab's cycle: pick the next images to label, with the current model's predictions for CVAT",
        output="lab",
    ),
    "cycle learn": Tool(
        "cellseg_pl.lab.cycle:cycle_learn",
        "the lab's cycle: corrected CVAT zip -> fine-tune -> compare on the test set -> next version if not worse",
        output="lab",
    ),
    "cycle status": Tool(
        "cellseg_pl.lab.cycle:cycle_status",
        "the lab's cycle: versions, their parents, labels and test metrics",
        output="lab",
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



def _flags(tool: Tool, function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The function's arguments that are flags (with the inference options when it takes them), by name."""
    params = {n: p for n, p in inspect.signature(function).parameters.items()
              if n not in tool.skip and p.kind is not p.VAR_KEYWORD}
    if tool.inference:
        from cellseg_pl.infer.options import InferenceOptions

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
        from cellseg_pl.infer.options import InferenceOptions

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
        return report_error(err, args, tool.output)
    print(tool.report(result, args))
    return 0
