"""``yolo segment train key=value ...`` -> ``python -m cellseg_pl fit --section.key value ...``.

One table (:data:`cellseg_pl.train.yolo_arg_table.TABLE`) says, for every ``yolo segment train`` argument cellseg_pl
understands, which option it becomes and how; ``scripts/train_yolov8.py`` uses it to run the user guide's command with
one word changed, and the table in docs/yolo-args.md is :func:`markdown_table`. An argument that is not in the
table, or a malformed one, stops with an error naming it: nothing is silently ignored. The few accepted arguments
that change nothing here (``plots``, ``verbose``, ``augment``, ...) print a note saying why.

Where the guide's command leaves a setting out, the run gets Ultralytics' default for the settings that change the
trained model and differ from cellseg_pl's own defaults: ``seed=0``, ``deterministic=True`` and ``amp=True``
(mixed precision on a GPU), and ``device`` unset means GPU 0 when there is one, else the CPU.

Example:
    >>> cli, notes = to_cli_args(["segment", "train", "data=d/dataset.yaml", "epochs=3", "device=cpu"])
    >>> cli[:5]
    ['fit', '--data.dataset', 'd/dataset.yaml', '--trainer.max_epochs', '3']
"""

from __future__ import annotations

import difflib
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from cellseg_pl.errors import YoloArgError
from cellseg_pl.train.yolo_arg_table import BY_KEY, TABLE

#: The guide's step 3, verbatim (the word ``yolo`` becomes ``python scripts/train_yolov8.py``).
GUIDE_STEP3 = (
    "segment train "
    "data=cell-analyzer/ml-data/training_data/subset_200/dataset.yaml "
    "model=cell-analyzer/ml-data/models/yolov8s_cells_v1.0.pt "
    "epochs=100 imgsz=640 batch=8 device=0 "
    "project=cell-analyzer/ml-data/training_runs name=yolov8s_cells_v2.0 "
    "patience=20 lr0=0.0005 augment=True degrees=180.0 scale=0.5 flipud=0.5 fliplr=0.5 mosaic=1.0 copy_paste=0.3"
).split()


# ---------------------------------------------------------------------------------------------- translation
def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_yolo_args(argv: list[str]) -> dict[str, Any]:
    """``[segment train] key=value ...`` -> ``{key: value}``, every value checked.

    Raises:
        YoloArgError: a malformed, unknown, unsupported or repeated argument (the message names it).
    """
    args = list(argv)
    if args and args[0] == "yolo":
        args = args[1:]
    if args[:2] == ["segment", "train"]:
        args = args[2:]
    elif args[:1] == ["train"]:
        args = args[1:]
    elif args and "=" not in args[0]:
        raise YoloArgError(f"{' '.join(args[:2])}: train_yolov8.py runs 'yolo segment train' only")
    given: dict[str, Any] = {}
    for raw in args:
        item = raw[2:] if raw.startswith("--") and "=" in raw else raw  # yolo accepts --key=value too
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise YoloArgError(f"{raw}: expected key=value, as yolo takes them (e.g. epochs=100)")
        if not text:
            raise YoloArgError(f"{key}=: no value given")
        spec = BY_KEY.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, BY_KEY, n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise YoloArgError(
                f"{key}={text}: not supported by cellseg_pl{hint} (supported arguments: docs/yolo-args.md)"
            )
        if key in given:
            raise YoloArgError(f"{key}: given twice")
        given[key] = spec.parse(key, text)
    return given


def _run_from_checkpoint(path: str) -> tuple[str, str] | None:
    """``<project>/<name>/weights/last.ckpt`` -> (project, name)."""
    p = Path(path)
    if p.parent.name == "weights" and p.parent.parent.name:
        return str(p.parent.parent.parent), p.parent.parent.name
    return None


def to_cli_args(
    argv: list[str], cuda_available: bool = False, gpu_count: int | None = None
) -> tuple[list[str], list[str]]:
    """Translate ``yolo segment train`` arguments into ``python -m cellseg_pl fit`` arguments.

    Args:
        argv: ``[segment train] key=value ...`` (a leading ``yolo`` is dropped too).
        cuda_available: whether a GPU is there (decides what an unset ``device`` means, as in Ultralytics).
        gpu_count: the number of CUDA GPUs this machine has: ``device=N`` beyond them is refused here, naming
            ``device``; None: not checked.

    Returns:
        ``(cli_args, notes)``: arguments for :func:`cellseg_pl.__main__.main`, starting with ``fit``, and one line
        per argument whose meaning differs from Ultralytics' or that changes nothing here.

    Raises:
        YoloArgError: see :func:`parse_yolo_args`, plus combinations that cannot work.
    """
    given = parse_yolo_args(argv)
    notes: list[str] = []
    head: list[str] = ["fit"]
    cli: list[str] = []

    resume = given.get("resume", False)
    model = given.get("model")
    if resume is True and isinstance(model, str) and model.endswith(".ckpt"):
        resume = model
    if resume:
        if resume is True:
            project = given.get("project", "checkpoints")
            name = given.get("name", "train")
            ckpt_path = "last"
        else:
            project, name = _run_from_checkpoint(resume) or ("checkpoints", "train")
            project, name = given.get("project", project), given.get("name", name)
            ckpt_path = resume
        config = Path(project) / name / "config.yaml"
        if config.is_file():
            head += ["--config", str(config)]
        head += ["--project", project, "--name", name]
        cli += ["--ckpt_path", ckpt_path]
        notes.append(f"resume: continuing the run in {Path(project) / name} with its config.yaml")

    for spec in TABLE:
        if spec.simple and spec.key in given:
            if resume and spec.key in ("model", "project", "name"):
                continue
            cli += [spec.option, _format(given[spec.key])]

    if "model" not in given and not resume:
        notes.append("model: not given, training yolov8n-seg.yaml from scratch (Ultralytics would download weights)")

    if "imgsz" in given:
        imgsz = given["imgsz"]
        rounded = -(-imgsz // 32) * 32
        if rounded != imgsz:
            notes.append(f"imgsz={imgsz} is not a multiple of 32: using {rounded}, as Ultralytics does")
        cli += ["--data.imgsz", str(rounded)]

    # device -> accelerator/devices; unset: what Ultralytics would pick
    if "device" in given:
        accelerator, devices = given["device"]
        if accelerator == "gpu" and gpu_count is not None and max(devices) >= gpu_count:
            text = ",".join(str(d) for d in devices)
            have = f"{gpu_count} CUDA GPU(s): device=0..{gpu_count - 1}" if gpu_count else "no CUDA GPU"
            raise YoloArgError(f"device={text}: this machine has {have}; use device=cpu to train on the CPU")
    elif resume:
        accelerator, devices = None, None
    else:
        accelerator, devices = ("gpu", [0]) if cuda_available else ("cpu", 1)
        notes.append(f"device: not given, using {'GPU 0' if cuda_available else 'the CPU'} (as Ultralytics would)")
    if accelerator is not None:
        cli += ["--trainer.accelerator", accelerator, "--trainer.devices", _format(devices)]
    n_devices = len(devices) if isinstance(devices, list) else 1

    if "batch" in given:
        batch = given["batch"]
        per_device = batch // n_devices
        if per_device < 1:
            raise YoloArgError(f"batch={batch}: fewer images than the {n_devices} devices")
        if n_devices > 1:
            rest = f" ({batch % n_devices} dropped, as Ultralytics does)" if batch % n_devices else ""
            notes.append(f"batch={batch} is the total over {n_devices} devices: {per_device} per device{rest}")
        cli += ["--data.batch_size", str(per_device)]

    if "seed" in given or not resume:
        cli += ["--seed_everything", str(given.get("seed", 0))]
    if "deterministic" in given or not resume:
        cli += ["--trainer.deterministic", "warn" if given.get("deterministic", True) else "false"]
    if "amp" in given or not resume:
        amp = given.get("amp", "fp16")
        if amp == "bf16":
            precision = "bf16-mixed"
        elif amp == "fp16" and accelerator == "gpu":
            precision = "16-mixed"
        else:
            precision = "32-true"
            if amp == "fp16" and "amp" in given:
                notes.append("amp=True: mixed precision is for GPUs; Ultralytics turns it off on the CPU too")
        cli += ["--trainer.precision", precision]

    if given.get("exist_ok"):
        raise YoloArgError(
            "exist_ok=True: cellseg_pl never writes into an earlier run's folder; choose a new name=, or resume=True "
            "to continue that run"
        )
    if given.get("val") is False:
        raise YoloArgError("val=False: cellseg_pl validates every epoch (best.ckpt and patience need it)")
    for key in ("plots", "verbose", "augment", "half"):
        if key in given:
            notes.append(f"{key}={given[key]}: {_plain(BY_KEY[key].note)}")
    if given.get("optimizer", "auto") == "auto" and "lr0" in given:
        notes.append(
            f"lr0={given['lr0']}: optimizer=auto (the default) ignores lr0 and picks its own, exactly as Ultralytics "
            f"does; add optimizer=AdamW (or SGD) to use lr0"
        )
    return head + cli, notes


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


def markdown_table() -> str:
    """The table of docs/yolo-args.md: each ``yolo segment train`` argument, its cellseg_pl option and how it maps."""
    lines = ["| `yolo` argument | cellseg_pl option | notes |", "| --- | --- | --- |"]
    for spec in TABLE:
        option = ", ".join(f"`{o.strip()}`" for o in spec.option.split(",")) if spec.option != "-" else "(none)"
        lines.append(f"| `{spec.key}` | {option} | {spec.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``fit`` from ``yolo segment train`` arguments; returns the exit code (2: a bad argument)."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: train_yolov8.py [segment train] key=value ...   (the arguments of 'yolo segment train')\n"
            "Runs 'python -m cellseg_pl fit' with the equivalent options; the mapping is in docs/yolo-args.md."
        )
        return 0 if argv else 2
    try:
        cli, notes = to_cli_args(argv, cuda_available=torch.cuda.is_available(), gpu_count=torch.cuda.device_count())
    except YoloArgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print("running: python -m cellseg_pl " + shlex.join(cli), file=sys.stderr)
    from cellseg_pl.__main__ import main as cellseg_main

    with warnings.catch_warnings():
        # we hand LightningCLI its arguments on purpose (they were translated from this script's own)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cellseg_main(cli)
