"""The ``yolo segment train`` arguments cellseg_pl understands: for each, the option it becomes and its value check.

:data:`TABLE` holds one :class:`YoloArg` per argument: the ``python -m cellseg_pl fit`` option, a parser that turns
the text into a value or raises :class:`YoloArgError` naming the argument, and the docs/yolo-args.md note on how it maps.
:mod:`cellseg_pl.train.yolo_args` translates a command line with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from cellseg_pl.errors import YoloArgError
from cellseg_pl.train.recipe import OPTIMIZERS


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
        note: how it maps, when that is more than a rename (docs/yolo-args.md text).
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
    YoloArg(
        "workers", "--data.num_workers", _int,
        "per device, as Ultralytics; unset: `auto` (GPU: cores per device; CPU: none up to 4 cores)",
    ),
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
        "`SGD`, `Adam`, `AdamW`, `MuSGD` or `auto`; `auto` ignores `lr0` (and `momentum`), exactly as Ultralytics does",
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
