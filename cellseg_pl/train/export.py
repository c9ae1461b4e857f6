"""A trained run -> an Ultralytics ``.pt`` model file that ``ultralytics.YOLO(path)`` and ``yolo segment val`` load.

``python -m cellseg_pl export --ckpt checkpoints/train/weights/best.ckpt --output models/yolov8s_cells_v2.0.pt``

The exported file holds the weights validation scored (the EMA when the run kept one) in float32, so it predicts
exactly what the run validated (``--half`` halves the file as Ultralytics does, at the cost of tiny differences: on
the demo data boxes move by < 0.01 px and the worst mask IoU to the float32 masks is 0.99), the class names, and
``train_args`` with ``task``, ``imgsz`` and ``data`` (so ``yolo segment val model=<file>`` knows the input size and
data set) plus the run's settings under their Ultralytics names, as a record of how it was trained.

Safety, after the guide's "always back up your current model":

* an existing file is never replaced, whatever the flags: a new model gets a new version name
  (``yolov8s_cells_v2.0.pt``, ``v2.1``, ...);
* the file is written to a temporary name next to the target (``.<name>.pt.partial-<pid>``) and only then linked
  into place, so a crash never leaves a half-written model where a model is expected; the next export into that
  folder removes the temporary files of killed exports (only those whose process is gone);
* a network with NaN/Inf weights (a diverged run), or with ``--half`` weights beyond float16's range, is refused.

Example:
    >>> from cellseg_pl.train.export import export_model
    >>> export_model("checkpoints/train/weights/best.ckpt", "models/yolov8s_cells_v2.0.pt")  # doctest: +SKIP
    PosixPath('models/yolov8s_cells_v2.0.pt')
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg_pl.errors import ExportError, ModelError
from cellseg_pl.yolo.network import load_ultralytics_checkpoint, load_weights, save_ultralytics_checkpoint
from cellseg_pl.files import atomic_file, remove_stale_partials, write_failure_cause

log = logging.getLogger(__name__)

def _train_arg_names() -> tuple[str, ...]:
    """Settings of a run that keep their name in Ultralytics' ``train_args``: the ``yolo`` arguments that map to a
    cellseg_pl option of the same name (:data:`cellseg_pl.train.yolo_arg_table.TABLE`) and that Ultralytics knows.

    Prediction/validation thresholds (``conf``, ``iou``, ``max_det``) are not among them: they are not training
    settings. ``imgsz`` and ``data`` are set from the checkpoint's data module.
    """
    from cellseg_pl.yolo.network import ultralytics_arg_names
    from cellseg_pl.train.yolo_arg_table import TABLE

    known = ultralytics_arg_names()
    return tuple(a.key for a in TABLE if a.simple and a.option in (f"--model.{a.key}", f"--data.{a.key}")
                 and a.key in known)


def nonfinite_tensors(net: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Names of the floating-point parameters/buffers of ``net`` holding a NaN or Inf (after a cast to ``dtype``)."""
    bad = []
    for name, tensor in net.state_dict().items():
        if tensor.dtype.is_floating_point:
            t = tensor if dtype is None else tensor.to(dtype)
            if not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def _check_finite(net: nn.Module, source: Path, half: bool) -> None:
    bad = nonfinite_tensors(net)
    if bad:
        raise ExportError(
            f"--ckpt: {source} holds NaN/Inf weights in {len(bad)} tensors (e.g. {bad[0]}): the run diverged; "
            f"export an earlier checkpoint or retrain with a lower --model.lr0"
        )
    bad = nonfinite_tensors(net, torch.float16) if half else []
    if bad:
        raise ExportError(
            f"--half: {source} has weights beyond the float16 range (65504) in {len(bad)} tensors (e.g. {bad[0]}); "
            f"export without --half"
        )


def _train_args(info: dict[str, Any]) -> dict[str, Any]:
    hparams = info.get("hparams") or {}
    args = {k: hparams[k] for k in _train_arg_names() if hparams.get(k) is not None}
    if info.get("imgsz"):
        args["imgsz"] = int(info["imgsz"])
    if info.get("data"):
        data = Path(str(info["data"]))
        # absolute, so `yolo segment val model=<file>` finds it from any folder (training paths are relative to
        # the folder training ran in; one that cannot be found from here is kept as it was)
        args["data"] = str(data.resolve()) if data.is_file() else str(data)
    args["task"] = "segment"
    return args


def _check_output(output: Path) -> None:
    if output.suffix != ".pt":
        raise ExportError(f"--output: {output} must end in .pt (Ultralytics loads model files by that suffix)")
    if output.exists() or output.is_symlink():
        raise ExportError(
            f"--output: {output} already exists and is never replaced (back up models, version them); choose a new "
            f"version name, e.g. {_next_version_hint(output)}"
        )


def _next_version_hint(output: Path) -> str:
    """A free name to suggest: ``models/x_v2.0.pt`` -> ``models/x_v2.1.pt``; ``models/x.pt`` -> ``models/x_2.pt``."""
    stem = output.stem
    head, _, minor = stem.rpartition(".")
    if head and minor.isdigit():
        n = int(minor) + 1
        while (candidate := output.with_name(f"{head}.{n}.pt")).exists():
            n += 1
        return str(candidate)
    n = 2
    while (candidate := output.with_name(f"{stem}_{n}.pt")).exists():
        n += 1
    return str(candidate)


def export_model(ckpt: str | Path, output: str | Path, half: bool = False) -> Path:
    """Write the network of a cellseg_pl checkpoint (or an Ultralytics ``.pt``) as an Ultralytics ``.pt``.

    Args:
        ckpt: a cellseg_pl ``.ckpt`` (``weights/best.ckpt`` or ``last.ckpt`` of a run; its EMA weights are used)
            or an Ultralytics ``.pt`` (re-written without optimizer state; a pickle: trusted files only).
        output: the model file to create, ending in ``.pt``; its folder is created. It must not exist.
        half: store float16 weights (half the size, as Ultralytics' own files) instead of float32.

    Returns:
        ``output``.

    Raises:
        ExportError: ``output`` exists or is not a ``.pt``; ``ckpt`` is missing or not a model checkpoint; the
            network has NaN/Inf weights; writing failed.
        OSError: the folder cannot be created or the file cannot be written (no space, no permission).
    """
    ckpt, output = Path(ckpt), Path(output)
    _check_output(output)
    if not ckpt.is_file():
        raise ExportError(f"--ckpt: {ckpt} does not exist; give a run's weights/best.ckpt")
    try:
        net, names, info = load_weights(ckpt, flag="--ckpt")
    except ModelError as e:
        raise ExportError(str(e)) from None
    _check_finite(net, ckpt, half)

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output.parent, ".pt", "a killed export")
    try:
        with atomic_file(output, replace=False) as tmp:  # never replaces a file another process created meanwhile
            try:
                save_ultralytics_checkpoint(net, tmp, names, _train_args(info), half=half)
            except RuntimeError as e:  # torch's zip writer reports a full disk this way
                cause = write_failure_cause(output.parent)
                raise ExportError(
                    f"--output: writing {output} failed: {cause}" if cause else
                    f"--output: writing {output} failed ({e}); check free space and permissions"
                ) from None
            load_ultralytics_checkpoint(tmp)  # read it back before it takes the model's name
    except FileExistsError:
        _check_output(output)
        raise
    log.debug("exported %s -> %s (%d classes: %s, imgsz %s)", ckpt, output, len(names), names, info.get("imgsz"))
    return output
