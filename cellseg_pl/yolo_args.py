"""``yolo segment train key=value ...`` -> ``python -m cellseg_pl fit --section.key value ...``.

One table (:data:`TABLE`) says, for every ``yolo segment train`` argument cellseg_pl understands, which option it
becomes and how; ``scripts/train_yolov8.py`` uses it to run the user guide's command with one word changed, and
the README's "Coming from ``yolo segment train``" table is :func:`markdown_table`. An argument that is not in the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

#: Optimizers cellseg_pl builds (Ultralytics also has Adamax, NAdam, RAdam, RMSProp, MuSGD).
OPTIMIZERS = ("SGD", "Adam", "AdamW", "auto")


class YoloArgError(ValueError):
    """A ``yolo`` argument that is unknown, unsupported or malformed; the message names it."""


# ---------------------------------------------------------------------------------------------- value parsers
def _int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise YoloArgError(f"{key}={text}: expected a whole number, e.g. {key}=100") from None


def _float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise YoloArgError(f"{key}={text}: expected a number, e.g. {key}=0.5") from None


def _fraction(key: str, text: str) -> float:
    value = _float(key, text)
    if not 0.0 <= value <= 1.0:
        raise YoloArgError(f"{key}={text}: expected a fraction between 0 and 1")
    return value


def _bool(key: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise YoloArgError(f"{key}={text}: expected True or False")


def _str(key: str, text: str) -> str:
    return text


def _optimizer(key: str, text: str) -> str:
    for name in OPTIMIZERS:
        if text.lower() == name.lower():
            return name
    raise YoloArgError(f"{key}={text}: cellseg_pl supports {', '.join(OPTIMIZERS)}")


def _imgsz(key: str, text: str) -> int:
    value = _int(key, text)
    if value < 32:
        raise YoloArgError(f"{key}={text}: expected an image size of at least 32 px")
    return value


def _batch(key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise YoloArgError(
            f"{key}={text}: expected a whole number of images >= 1 (AutoBatch, batch=-1 or a memory fraction, "
            f"is not supported)"
        )
    return value


def _device(key: str, text: str) -> tuple[str, list[int] | int]:
    """``cpu`` / ``mps`` / ``0`` / ``0,1`` / ``[0,1]`` / ``cuda:0`` -> (accelerator, devices)."""
    lowered = text.lower().strip()
    if lowered in ("cpu", "mps"):
        return lowered, 1
    ids = lowered.removeprefix("cuda:").strip("[]() ")
    try:
        gpus = [int(i) for i in ids.split(",") if i.strip()]
    except ValueError:
        gpus = []
    if not gpus or any(g < 0 for g in gpus):
        raise YoloArgError(
            f"{key}={text}: expected cpu, mps, a GPU index (device=0) or a list of them (device=0,1); automatic GPU "
            f"selection (-1) and other accelerators are not supported"
        )
    return "gpu", gpus


def _amp(key: str, text: str) -> str:
    lowered = text.lower()
    if lowered in ("true", "fp16"):
        return "fp16"
    if lowered in ("false", "fp32"):
        return "fp32"
    if lowered == "bf16":
        return "bf16"
    raise YoloArgError(f"{key}={text}: expected True, False, fp16, bf16 or fp32")


def _resume(key: str, text: str) -> bool | str:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if not text.endswith(".ckpt"):
        raise YoloArgError(
            f"{key}={text}: cellseg_pl resumes its own runs: resume=True (the run in project/name) or "
            f"resume=<run>/weights/last.ckpt; to fine-tune from an Ultralytics .pt use model=<file>.pt"
        )
    return text


def _cache(key: str, text: str) -> str:
    value = {"true": "ram", "ram": "ram", "disk": "disk", "false": "none", "none": "none", "auto": "auto"}.get(
        text.strip().lower()
    )
    if value is None:
        raise YoloArgError(f"{key}={text}: expected True, ram, disk or False, e.g. {key}=ram")
    return value


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(key: str, text: str) -> str:
        if text.lower() not in allowed:
            raise YoloArgError(f"{key}={text}: train_yolov8.py runs '{' '.join(allowed)}' only")
        return text.lower()

    return parse


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class YoloArg:
    """One ``yolo segment train`` argument.

    Attributes:
        key: the ``yolo`` argument name.
        option: the cellseg_pl option it sets; ``-`` when it changes nothing here (see ``note``).
        parse: ``(key, text) -> value``; raises :class:`YoloArgError` naming the argument.
        note: how it maps, when that is more than a rename (README text).
        simple: ``option`` takes the value as is (the other arguments are handled in :func:`to_cli_args`).
    """

    key: str
    option: str
    parse: Callable[[str, str], Any]
    note: str = ""
    simple: bool = True


def _model(key: str, parse: Callable = _float, note: str = "") -> YoloArg:
    return YoloArg(key, f"--model.{key}", parse, note)


def _data(key: str, parse: Callable = _float, note: str = "") -> YoloArg:
    return YoloArg(key, f"--data.{key}", parse, note)


TABLE: tuple[YoloArg, ...] = (
    YoloArg("data", "--data.dataset", _str, "the YOLO-seg `dataset.yaml`"),
    YoloArg(
        "model", "--model.model", _str,
        "a local Ultralytics `.pt` to fine-tune (e.g. `yolov8s_cells_v1.0.pt`) or a model yaml (`yolov8s-seg.yaml`) "
        "to train from scratch; nothing is downloaded, so `yolov8s-seg.pt` must be a local file. Unset: "
        "`yolov8n-seg.yaml` from scratch (Ultralytics would download pretrained weights)",
    ),
    YoloArg(
        "reinit_head", "--model.reinit_head", _bool,
        "cellseg_pl's own: when the `.pt` has another class count than `dataset.yaml`, train a new class head and "
        "keep every other weight (without it the run stops and names both counts)",
    ),
    YoloArg("epochs", "--trainer.max_epochs", _int),
    YoloArg("patience", "--early_stopping.patience", _int, "epochs without a better `fitness`, as Ultralytics"),
    YoloArg(
        "batch", "--data.batch_size", _batch,
        "Ultralytics' `batch` is the total over all devices, ours is per device: divided by the number of devices "
        "(`batch=16 device=0,1` -> 8). AutoBatch (`-1`, fractions) is not supported",
        simple=False,
    ),
    YoloArg("imgsz", "--data.imgsz", _imgsz, "rounded up to a multiple of 32, as Ultralytics does", simple=False),
    YoloArg(
        "device", "--trainer.accelerator, --trainer.devices", _device,
        "`0` -> `gpu`, `[0]`; `0,1` -> `gpu`, `[0, 1]` (DDP); `cpu`; `mps`. Unset: GPU 0 if there is one, else "
        "the CPU (as Ultralytics)",
        simple=False,
    ),
    YoloArg("workers", "--data.num_workers", _int, "per device, as Ultralytics; unset: `auto` (cores per device)"),
    YoloArg(
        "cache", "--data.cache", _cache,
        "`True`/`ram` -> `ram`, `disk` -> `disk`, `False` -> `none`; unset: `auto` (RAM when the images fit half "
        "the free memory, Ultralytics: no cache)",
    ),
    YoloArg("project", "--project", _str, "the run goes to `<project>/<name>`"),
    YoloArg(
        "name", "--name", _str, "an existing run folder is never reused: the run goes to `<name>2`, ... as in Ultralytics"
    ),
    YoloArg(
        "exist_ok", "-", _bool,
        "`False` (the default) only: cellseg_pl never writes into an earlier run's folder",
        simple=False,
    ),
    YoloArg(
        "resume", "--ckpt_path", _resume,
        "`resume=True` continues the run in `project`/`name` (or `model=<run>/weights/last.ckpt`) with that run's "
        "`config.yaml`; `resume=<run>/weights/last.ckpt` too. Ultralytics' `last.pt` cannot be resumed here",
        simple=False,
    ),
    YoloArg("seed", "--seed_everything", _int, "unset: 0, Ultralytics' default", simple=False),
    YoloArg(
        "deterministic", "--trainer.deterministic", _bool,
        "`True` (also when unset, Ultralytics' default) -> `warn`: deterministic algorithms, a warning where there "
        "is none (Ultralytics' `warn_only`); `False` -> `false`",
        simple=False,
    ),
    YoloArg(
        "amp", "--trainer.precision", _amp,
        "`True`/`fp16` (also when unset, Ultralytics' default) -> `16-mixed` on a GPU, `32-true` on CPU/MPS where "
        "Ultralytics turns AMP off; `bf16` -> `bf16-mixed`; `False`/`fp32` -> `32-true`",
        simple=False,
    ),
    YoloArg(
        "val", "-", _bool,
        "`True` (the default) only: cellseg_pl validates every epoch, as `best.ckpt` and `patience` need",
        simple=False,
    ),
    YoloArg(
        "plots", "-", _bool,
        "no effect: a run always writes `results.csv`, `results.png`, validation pictures (`val_pred*.png`) and "
        "TensorBoard logs",
        simple=False,
    ),
    YoloArg("verbose", "-", _bool, "no effect: cellseg_pl logs the same either way", simple=False),
    YoloArg(
        "augment", "-", _bool,
        "no effect, as in `yolo segment train`: Ultralytics' `augment` is test-time augmentation for "
        "predict/val (only its final re-validation of `best.pt` uses it). Training augmentation is always on and "
        "set by `degrees`, `scale`, `flipud`, `fliplr`, `mosaic`, `copy_paste`, ...",
        simple=False,
    ),
    YoloArg(
        "half", "-", _bool, "no effect, as in `yolo segment train` (an inference setting); see `amp`", simple=False
    ),
    YoloArg("task", "-", _choice("segment"), "`segment` only", simple=False),
    YoloArg("mode", "-", _choice("train"), "`train` only", simple=False),
    YoloArg(
        "optimizer", "--model.optimizer", _optimizer,
        "`SGD`, `Adam`, `AdamW` or `auto`; `auto` ignores `lr0` (and `momentum`), exactly as Ultralytics does",
    ),
    _model("lr0", note="ignored by `optimizer=auto`, as in Ultralytics"),
    _model("lrf"),
    _model("momentum"),
    _model("weight_decay"),
    _model("warmup_epochs"),
    _model("warmup_momentum"),
    _model("warmup_bias_lr"),
    _model("nbs", _int),
    _model("cos_lr", _bool),
    _model("box"),
    _model("cls"),
    _model("dfl"),
    YoloArg("overlap_mask", "--data.overlap_mask", _bool, "linked to the model's loss"),
    _data("mask_ratio", _int),
    _data("hsv_h", _fraction),
    _data("hsv_s", _fraction),
    _data("hsv_v", _fraction),
    _data("degrees"),
    _data("translate", _fraction),
    _data("scale"),
    _data("shear"),
    _data("perspective", _fraction),
    _data("flipud", _fraction),
    _data("fliplr", _fraction),
    _data("mosaic", _fraction),
    _data("mixup", _fraction),
    _data("copy_paste", _fraction),
    _data("copy_paste_mode", _choice("flip", "free"), "`flip` as Ultralytics; `free`: cells of another image"),
    _data("close_mosaic", _int),
)

BY_KEY: dict[str, YoloArg] = {a.key: a for a in TABLE}

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
                f"{key}={text}: not supported by cellseg_pl{hint} (supported arguments: README, 'Coming from "
                f"yolo segment train')"
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
    """The README table: each ``yolo segment train`` argument, its cellseg_pl option and how it maps."""
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
            "Runs 'python -m cellseg_pl fit' with the equivalent options; the mapping is in README.md, "
            "'Coming from yolo segment train'."
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
