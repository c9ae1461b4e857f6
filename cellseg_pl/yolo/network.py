"""The one door to Ultralytics: build or load a YOLO-seg network (YOLOv8, 11, 12 or 26), attach its loss, save Ultralytics ``.pt`` files.

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
from typing import Any

import torch
from torch import nn

from cellseg_pl.data.labels import class_names_of
from cellseg_pl.errors import ModelError

log = logging.getLogger(__name__)


def ultralytics_defaults() -> dict[str, Any]:
    """Ultralytics' default training configuration (``ultralytics.cfg.get_cfg()``) as a dict."""
    from ultralytics.cfg import get_cfg

    return vars(get_cfg())


def ultralytics_version() -> str:
    """The installed Ultralytics version (model cards record it)."""
    import ultralytics

    return ultralytics.__version__


def ultralytics_arg_names() -> frozenset[str]:
    """The argument names Ultralytics' trainer knows (its default configuration's keys)."""
    return frozenset(ultralytics_defaults())


def _from_yaml(name: str, num_classes: int) -> nn.Module:
    """Build from a yaml path or a bare Ultralytics config name (``yolov8n-seg.yaml``); never downloads."""
    from ultralytics.nn.tasks import SegmentationModel

    if not str(name).endswith((".yaml", ".yml")):
        raise ModelError(
            f"--model.model: {name} is neither a model yaml (e.g. yolov8n-seg.yaml) nor an Ultralytics .pt file"
        )
    try:
        return check_family(SegmentationModel(str(name), nc=num_classes, verbose=False), name)
    except FileNotFoundError:
        raise ModelError(
            f"--model.model: {name} is not a file and not an Ultralytics model config; use e.g. yolov8n-seg.yaml "
            f"or yolov8s-seg.yaml"
        ) from None
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - a config Ultralytics cannot build as a segmentation model
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"--model.model: {name} does not build as a segmentation model ({detail}); cellseg_pl "
                         f"trains {FAMILIES}") from None


#: The model families cellseg_pl trains: their segmentation head is Ultralytics' ``Segment`` (YOLOv8, YOLO11, YOLO12)
#: or YOLO26's end-to-end ``Segment26``.
FAMILIES = ("YOLOv8, YOLO11, YOLO12 and YOLO26 -seg models (e.g. yolov8n-seg.yaml, yolo11s-seg.yaml, "
            "yolo26n-seg.yaml)")


def check_family(net: nn.Module, model: Any, flag: str | None = "--model.model") -> nn.Module:
    """``net`` itself when cellseg_pl trains its family, else one :class:`ModelError` line naming what it is."""
    from ultralytics.nn.modules.head import Segment, Segment26

    head = net.model[-1] if hasattr(net, "model") and len(net.model) else None
    kind = type(head).__name__ if head is not None else type(net).__name__
    if type(head) in (Segment, Segment26):
        return net
    if isinstance(head, Segment):  # YOLOE's open-vocabulary heads
        what = f"a segmentation model with another head ({kind}, with its own loss), which cellseg_pl does not train"
    else:
        task = {"Detect": "detection", "Pose": "pose", "OBB": "oriented-box", "Classify": "classification"}
        base = next((task[c.__name__] for c in type(head).__mro__ if c.__name__ in task), None)
        article = "an" if base and base[0] in "aeiou" else "a"
        what = f"{article} {base} model ({kind}), not a segmentation model" if base else f"not a model we train ({kind})"
    raise _error(flag, f"{model} is {what}; cellseg_pl trains {FAMILIES}")


def nms_head(net: nn.Module) -> nn.Module:
    """Make an end-to-end head (YOLO26) infer with its one-to-many branch and NMS, as Ultralytics 8.4 does by default
    (``nms=None``: its validator and ``AutoBackend`` set ``model.end2end = False``); both branches still train.

    Every network cellseg_pl builds or loads goes through here, so evaluation and inference see one output layout:
    (B, 4 + nc + 32, anchors) before NMS. A ``.pt`` saved by a run with ``nms=False`` would otherwise give the
    one-to-one top-k layout.
    """
    head = net.model[-1]
    if getattr(head, "one2one_cv2", None) is not None and getattr(head, "cv2", None) is not None:
        head.end2end = False
    return net


def _error(flag: str | None, message: str) -> ModelError:
    """A :class:`ModelError` whose message starts with the flag that named the file, when there is one."""
    return ModelError(f"{flag}: {message}" if flag else message)


def _load_problem(path: Path, error: Exception, kind: str) -> str:
    """What is wrong with a file ``torch.load`` failed on, in one line (empty, truncated, pickled objects, other)."""
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes), not a {kind}: an interrupted save or copy? use another file"
    with path.open("rb") as f:
        head = f.read(4)
    text = str(error)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return f"{path} is not a readable {kind}: not a file torch.save writes ({type(error).__name__})"
    if "Weights only load failed" in text:
        return (
            f"{path} holds pickled Python objects, which a {kind} never does (an Ultralytics .pt? pass .pt files "
            f"as --model.model, or predict/select/export --model/--ckpt; load only files you trust)"
        )
    detail = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(error).__name__
    return (
        f"{path} is truncated or damaged ({size:,} bytes; {detail}): an interrupted save or copy? copy it again, or "
        f"use the run's other checkpoint (weights/last.ckpt, weights/best.ckpt)"
    )


def _torch_load(path: Path, weights_only: bool, kind: str, flag: str | None) -> Any:
    """``torch.load`` on the CPU; any failure becomes one :class:`ModelError` line saying what is wrong."""
    if not path.is_file():
        raise _error(flag, f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - any failure means "not a usable file": say which kind
        raise _error(flag, _load_problem(path, e, kind)) from None


def read_checkpoint(path: str | Path, flag: str | None = None) -> dict[str, Any]:
    """Read a cellseg_pl (Lightning) ``.ckpt`` without running code (``weights_only=True``) and check what it holds.

    The one reader of cellseg_pl checkpoints: :func:`load_weights` (``--model.model``, ``predict``, ``export``) and
    the CLI's ``--ckpt_path`` (before Lightning loads it) call it.

    Args:
        path: the checkpoint file.
        flag: the option that named it (``--ckpt_path``...), put at the start of error messages.

    Returns:
        The checkpoint dict; ``hyper_parameters`` holds ``model_yaml`` and ``num_classes``.

    Raises:
        ModelError: one line naming the file: missing, empty, truncated, pickled objects or not a cellseg_pl checkpoint.
    """
    path = Path(path)
    ckpt = _torch_load(path, True, "cellseg_pl checkpoint", flag)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "model_yaml" not in hp or "num_classes" not in hp or "state_dict" not in ckpt:
        raise _error(
            flag,
            f"{path} is a PyTorch file but not a cellseg_pl checkpoint (no model_yaml/num_classes/state_dict); give a "
            f"run's weights/best.ckpt or weights/last.ckpt",
        )
    return ckpt


def checkpoint_classes(ckpt: dict[str, Any]) -> dict[int, str]:
    """Class index -> name of a checkpoint :func:`read_checkpoint` returned (indices as names when none stored)."""
    hp = ckpt["hyper_parameters"]
    names = class_names_of(hp.get("class_names"))
    return names or {i: str(i) for i in range(int(hp["num_classes"]))}


def load_ultralytics_checkpoint(path: str | Path, flag: str | None = None) -> dict[str, Any]:
    """Unpickle an Ultralytics ``.pt`` (trusted files only) and check it holds a segmentation network.

    ``flag``: the option that named the file, put at the start of error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(
            flag,
            f"{path} does not exist (cellseg_pl never downloads weights; give a local .pt, or a model yaml such as "
            f"yolov8n-seg.yaml to train from scratch)",
        )
    ckpt = _torch_load(path, False, "PyTorch model file", flag)
    net = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(net, nn.Module):
        raise _error(flag, f"{path} holds no Ultralytics network (no 'model' or 'ema' entry)")
    from ultralytics.nn.tasks import SegmentationModel

    if not isinstance(net, SegmentationModel):
        raise _error(flag, f"{path} is a {type(net).__name__}, not a segmentation model; cellseg_pl trains {FAMILIES}")
    check_family(net, path, flag)
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
            Ultralytics ``.pt`` or a cellseg_pl ``.ckpt`` (its EMA weights) to fine-tune.
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
    elif str(model).endswith((".pt", ".ckpt")):
        if str(model).endswith(".pt"):
            ckpt = load_ultralytics_checkpoint(model, flag="--model.model")
            src, origin = (ckpt.get("ema") or ckpt.get("model")).float(), ckpt.get("date", "no date")
        else:  # a cellseg_pl run: its EMA weights, read without unpickling code
            src, _, info = load_weights(model, flag="--model.model")
            origin = f"a cellseg_pl run, imgsz {info.get('imgsz')}"
        src_nc = int(src.model[-1].nc)
        if src_nc != num_classes and not reinit_head:
            src_names = getattr(src, "names", {})
            raise ModelError(
                f"--model.model: {model} predicts {src_nc} classes {dict(src_names)} but the data has {num_classes} "
                f"{names}; fix dataset.yaml 'names' or pass --model.reinit_head true to train a new head"
            )
        if src_nc == num_classes:
            src_names = class_names_of(getattr(src, "names", None))
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
        log.info("loaded %s (%s)", model, origin)
    else:
        net = _from_yaml(model, num_classes)
    net = net.float()
    for name, p in net.named_parameters():
        # the distribution-focal-loss decoder is a fixed integral, never trained (Ultralytics freezes '.dfl')
        p.requires_grad_(".dfl" not in name)
    net.names = dict(names)
    net.train()
    return nms_head(net)



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
    model.args = {**ultralytics_defaults(), **(train_args or {}), "task": "segment"}
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


def load_weights(path: str | Path, flag: str | None = None) -> tuple[nn.Module, dict[int, str], dict[str, Any]]:
    """Load a network for inference or export from a cellseg_pl ``.ckpt`` or an Ultralytics ``.pt``.

    A Lightning ``.ckpt`` is read with :func:`read_checkpoint` (``torch.load(weights_only=True)``: no code runs) and
    gives the EMA weights when the run kept an EMA (the weights validation scored); an Ultralytics ``.pt`` is a
    pickle: trusted files only. ``flag``: the option that named the file, put at the start of error messages.

    Returns:
        ``(net, class_names, info)``: the network in float32 eval mode, index -> name, and ``info`` with
        ``imgsz`` (training input size, when known), ``data`` (the training ``dataset.yaml``, when known),
        ``hparams`` (the run's model and data settings, or the ``.pt``'s ``train_args``) and ``source``
        (``ckpt`` or ``pt``).

    Raises:
        ModelError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(flag, f"{path} does not exist")
    if path.suffix == ".ckpt":
        ckpt = read_checkpoint(path, flag)
        hp = ckpt["hyper_parameters"]
        names = class_names_of(hp.get("class_names"))
        net = build_network("", int(hp["num_classes"]), names or None, model_yaml=hp["model_yaml"])
        state = ckpt["state_dict"]
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "net."
        try:
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as e:  # weights that do not fit the network its own model_yaml describes
            first = str(e).strip().splitlines()[0]
            raise _error(flag, f"{path}: its weights do not fit the network it describes ({first})") from None
        data_hp = ckpt.get("datamodule_hyper_parameters") or {}
        hparams = {k: v for k, v in {**hp, **data_hp}.items() if k not in ("model_yaml", "_instantiator")}
        info = {"imgsz": data_hp.get("imgsz"), "data": data_hp.get("dataset"), "hparams": hparams, "source": "ckpt"}
    elif path.suffix == ".pt":
        ckpt = load_ultralytics_checkpoint(path, flag)
        net = (ckpt.get("ema") or ckpt.get("model")).float()
        names = class_names_of(getattr(net, "names", None))
        train_args = ckpt.get("train_args") or {}
        hparams = dict(train_args)
        info = {"imgsz": hparams.get("imgsz"), "data": hparams.get("data"), "hparams": hparams, "source": "pt"}
    else:
        raise _error(flag, f"{path}: expected a cellseg_pl .ckpt or an Ultralytics .pt")
    if not names:
        names = {i: str(i) for i in range(int(net.model[-1].nc))}
    net.names = names
    return nms_head(net).eval(), names, info
