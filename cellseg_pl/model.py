"""The one door to Ultralytics: build or load a YOLOv8-seg network, attach its loss, save Ultralytics ``.pt`` files.

Everything version-specific about Ultralytics (8.4 line: dict predictions, five-part loss, ``model.args``
contract) lives here; the rest of the project sees ``nn.Module``, tensors and plain dicts. Ultralytics is imported
lazily, inside functions, so importing :mod:`cellseg_pl` has no side effects.

Loading an Ultralytics ``.pt`` unpickles it (``torch.load(weights_only=False)``): only load files you trust.
"""

from __future__ import annotations

import datetime
import logging
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model file or name that cannot be used; the message says which and what to do."""


def _ultralytics_cfg_dict() -> dict[str, Any]:
    from ultralytics.cfg import get_cfg

    return vars(get_cfg())


def _from_yaml(name: str, num_classes: int) -> nn.Module:
    """Build from a yaml path or a bare Ultralytics config name (``yolov8n-seg.yaml``); never downloads."""
    from ultralytics.nn.tasks import SegmentationModel

    if not str(name).endswith((".yaml", ".yml")):
        raise ModelError(
            f"--model.model: {name} is neither a model yaml (e.g. yolov8n-seg.yaml) nor an Ultralytics .pt file"
        )
    try:
        return SegmentationModel(str(name), nc=num_classes, verbose=False)
    except FileNotFoundError:
        raise ModelError(
            f"--model.model: {name} is not a file and not an Ultralytics model config; use e.g. yolov8n-seg.yaml "
            f"or yolov8s-seg.yaml"
        ) from None


def load_ultralytics_checkpoint(path: str | Path) -> dict[str, Any]:
    """Unpickle an Ultralytics ``.pt`` (trusted files only) and check it holds a segmentation network."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"--model.model: {path} does not exist (cellseg_pl never downloads weights; give a local .pt, or a "
            f"model yaml such as yolov8n-seg.yaml to train from scratch)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a model file"
        raise ModelError(f"--model.model: {path} is not a readable PyTorch model file ({type(e).__name__}: {e})") from None
    net = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(net, nn.Module):
        raise ModelError(f"--model.model: {path} holds no Ultralytics network (no 'model' or 'ema' entry)")
    from ultralytics.nn.tasks import SegmentationModel

    if not isinstance(net, SegmentationModel):
        raise ModelError(f"--model.model: {path} is a {type(net).__name__}, not a segmentation model (-seg)")
    return ckpt


def build_network(
    model: str,
    num_classes: int,
    class_names: dict[int, str] | None = None,
    reinit_head: bool = False,
    model_yaml: dict | None = None,
) -> nn.Module:
    """Build the Ultralytics ``SegmentationModel``.

    Args:
        model: a model yaml (``yolov8n-seg.yaml``, ``yolov8s-seg.yaml`` or a path) to train from scratch, or an
            Ultralytics ``.pt`` to fine-tune.
        num_classes: number of classes of the data.
        class_names: index -> name; stored on the network (Ultralytics reads ``names``).
        reinit_head: when a ``.pt`` has another class count than the data, build a new head for ``num_classes``
            and keep every other weight (instead of stopping with an error).
        model_yaml: a network definition (Ultralytics' ``model.yaml`` dict); used instead of ``model`` when a
            Lightning checkpoint is reloaded, so the original ``.pt`` need not exist any more.

    Returns:
        The network in float32, train mode.
    """
    from ultralytics.nn.tasks import SegmentationModel

    names = class_names or {i: str(i) for i in range(num_classes)}
    if model_yaml is not None:
        net = SegmentationModel(deepcopy(model_yaml), nc=num_classes, verbose=False)
    elif str(model).endswith(".pt"):
        ckpt = load_ultralytics_checkpoint(model)
        src = (ckpt.get("ema") or ckpt.get("model")).float()
        src_nc = int(src.model[-1].nc)
        if src_nc != num_classes and not reinit_head:
            src_names = getattr(src, "names", {})
            raise ModelError(
                f"--model.model: {model} predicts {src_nc} classes {dict(src_names)} but the data has {num_classes} "
                f"{names}; fix dataset.yaml 'names' or pass --model.reinit_head true to train a new head"
            )
        if src_nc == num_classes:
            src_names = {int(k): str(v) for k, v in dict(getattr(src, "names", None) or {}).items()}
            if class_names and src_names and src_names != names:
                # same count, other names (or order): output k now learns the data's class k
                log.warning("--model.model: %s was trained on classes %s, the data names them %s; the data's "
                            "names are used, index by index", model, src_names, names)
            net = src
        else:
            net = SegmentationModel(deepcopy(src.yaml), nc=num_classes, verbose=False)
            own = net.state_dict()
            kept = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
            net.load_state_dict(kept, strict=False)
            log.info("re-initialised the head for %d classes; kept %d/%d tensors of %s", num_classes, len(kept), len(own), model)
        log.info("loaded %s (%s)", model, ckpt.get("date", "no date"))
    else:
        net = _from_yaml(model, num_classes)
    net = net.float()
    for name, p in net.named_parameters():
        # the distribution-focal-loss decoder is a fixed integral, never trained (Ultralytics freezes '.dfl')
        p.requires_grad_(".dfl" not in name)
    net.names = dict(names)
    net.train()
    return net


def attach_loss(net: nn.Module, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5, overlap_mask: bool = True) -> Callable:
    """Give the network the attribute namespace its loss reads and return the criterion.

    The criterion captures the network's device when built: call this after the network is on its device.

    Returns:
        ``criterion(preds, batch) -> (loss, parts)`` where ``loss`` is the weighted sum times the batch size
        (Ultralytics' convention) and ``parts`` a dict ``box_loss, seg_loss, cls_loss, dfl_loss`` (detached).
    """
    from ultralytics.utils.loss import v8SegmentationLoss

    args = {**_ultralytics_cfg_dict(), "box": box, "cls": cls, "dfl": dfl, "overlap_mask": overlap_mask}
    net.args = SimpleNamespace(**args)
    loss = v8SegmentationLoss(net)

    def criterion(preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = loss(preds, batch)
        parts = {k: parts[k] for k in ("box_loss", "seg_loss", "cls_loss", "dfl_loss")}
        return total.sum(), parts

    return criterion


def split_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Unpack an eval-mode forward: ``(detections (B, 4+nc+32, A), proto (B, 32, H/4, W/4), raw preds dict)``."""
    (det, proto), raw = outputs
    return det, proto, raw


def network_yaml(net: nn.Module) -> dict:
    """The network definition to rebuild it without its weights file."""
    return deepcopy(net.yaml)


def save_ultralytics_checkpoint(
    net: nn.Module,
    path: str | Path,
    class_names: dict[int, str],
    train_args: dict[str, Any] | None = None,
    half: bool = True,
) -> None:
    """Write ``net`` as an Ultralytics ``.pt`` that ``ultralytics.YOLO(path)`` loads.

    ``half`` stores float16 weights, as Ultralytics' own files do; ``half=False`` keeps float32, so the file
    predicts exactly what the network did (Ultralytics casts to float32 when it loads either).
    """
    import ultralytics

    model = deepcopy(net).float().cpu().eval()
    model.names = dict(class_names)
    model.nc = len(class_names)
    model.args = {**_ultralytics_cfg_dict(), **(train_args or {}), "task": "segment"}
    for attr in ("criterion",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt = {
        "date": datetime.datetime.now().isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "epoch": -1,
        "best_fitness": None,
        "model": model.half() if half else model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {**(train_args or {}), "task": "segment"},
        "train_metrics": {},
    }
    torch.save(ckpt, path)


def load_weights(path: str | Path) -> tuple[nn.Module, dict[int, str], dict[str, Any]]:
    """Load a network for inference or export from a cellseg_pl ``.ckpt`` or an Ultralytics ``.pt``.

    A Lightning ``.ckpt`` is read with ``torch.load(weights_only=True)`` (no code runs) and gives the EMA weights
    when the run kept an EMA (the weights validation scored); an Ultralytics ``.pt`` is a pickle: trusted files only.

    Returns:
        ``(net, class_names, info)``: the network in float32 eval mode, index -> name, and ``info`` with
        ``imgsz`` (training input size, when known), ``data`` (the training ``dataset.yaml``, when known),
        ``hparams`` (the run's model and data settings, or the ``.pt``'s ``train_args``) and ``source``
        (``ckpt`` or ``pt``).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist")
    if path.suffix == ".ckpt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means "not a cellseg_pl checkpoint"
            raise ModelError(f"{path} is not a readable cellseg_pl checkpoint ({type(e).__name__}: {e})") from None
        hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        if "model_yaml" not in hp or "state_dict" not in ckpt:
            raise ModelError(f"{path} is not a cellseg_pl checkpoint (no model_yaml / state_dict)")
        names = {int(k): str(v) for k, v in (hp.get("class_names") or {}).items()}
        net = build_network("", int(hp["num_classes"]), names or None, model_yaml=hp["model_yaml"])
        state = ckpt["state_dict"]
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "net."
        net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        data_hp = ckpt.get("datamodule_hyper_parameters") or {}
        hparams = {k: v for k, v in {**hp, **data_hp}.items() if k not in ("model_yaml", "_instantiator")}
        info = {"imgsz": data_hp.get("imgsz"), "data": data_hp.get("dataset"), "hparams": hparams, "source": "ckpt"}
    elif path.suffix == ".pt":
        ckpt = load_ultralytics_checkpoint(path)
        net = (ckpt.get("ema") or ckpt.get("model")).float()
        names = {int(k): str(v) for k, v in dict(getattr(net, "names", {}) or {}).items()}
        train_args = ckpt.get("train_args") or {}
        info = {
            "imgsz": train_args.get("imgsz"), "data": train_args.get("data"), "hparams": dict(train_args), "source": "pt"
        }
    else:
        raise ModelError(f"{path}: expected a cellseg_pl .ckpt or an Ultralytics .pt")
    if not names:
        names = {i: str(i) for i in range(int(net.model[-1].nc))}
    net.names = names
    return net.eval(), names, info
