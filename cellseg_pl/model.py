"""The one door to Ultralytics: build or load a YOLOv8-seg network, attach its loss, save Ultralytics ``.pt`` files.

Everything version-specific about Ultralytics (8.4 line: dict predictions, five-part loss, ``model.args``
contract) lives here; the rest of the project sees ``nn.Module``, tensors and plain dicts. Ultralytics is imported
lazily, inside functions, so importing :mod:`cellseg_pl` has no side effects.

Loading an Ultralytics ``.pt`` unpickles it (``torch.load(weights_only=False)``): only load files you trust.
"""

from __future__ import annotations

import datetime
import functools
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


def ultralytics_arg_names() -> frozenset[str]:
    """The argument names Ultralytics' trainer knows (its default configuration's keys)."""
    return frozenset(_ultralytics_cfg_dict())


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
    names = {int(k): str(v) for k, v in (hp.get("class_names") or {}).items()}
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
        raise _error(flag, f"{path} is a {type(net).__name__}, not a segmentation model (-seg)")
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
        log.info("loaded %s (%s)", model, origin)
    else:
        net = _from_yaml(model, num_classes)
    net = net.float()
    for name, p in net.named_parameters():
        # the distribution-focal-loss decoder is a fixed integral, never trained (Ultralytics freezes '.dfl')
        p.requires_grad_(".dfl" not in name)
    net.names = dict(names)
    net.train()
    return net


def attach_loss(
    net: nn.Module,
    box: float = 7.5,
    cls: float = 0.5,
    dfl: float = 1.5,
    overlap_mask: bool = True,
    chunked_mask_loss: bool = True,
) -> Callable:
    """Give the network the attribute namespace its loss reads and return the criterion.

    The criterion captures the network's device when built: call this after the network is on its device.

    Args:
        chunked_mask_loss: compute the mask part of Ultralytics' loss with :class:`CroppedMaskLoss` (the same value and
            gradients, memory bounded whatever the number of cells per image); False: Ultralytics' own, whose memory
            grows with cells per image times (mask side)^2 (Ultralytics issues #17961, #14812).

    Returns:
        ``criterion(preds, batch) -> (loss, parts)`` where ``loss`` is the weighted sum times the batch size
        (Ultralytics' convention) and ``parts`` a dict ``box_loss, seg_loss, cls_loss, dfl_loss`` (detached).
    """
    from ultralytics.utils.loss import v8SegmentationLoss

    args = {**_ultralytics_cfg_dict(), "box": box, "cls": cls, "dfl": dfl, "overlap_mask": overlap_mask}
    net.args = SimpleNamespace(**args)
    loss = (_chunked_segmentation_loss_class() if chunked_mask_loss else v8SegmentationLoss)(net)

    def criterion(preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = loss(preds, batch)
        parts = {k: parts[k] for k in ("box_loss", "seg_loss", "cls_loss", "dfl_loss")}
        return total.sum(), parts

    return criterion


class CroppedMaskLoss(torch.autograd.Function):
    """Ultralytics' per-image mask loss, computed in chunks of anchors with its gradient formed on the way.

    Ultralytics' ``single_mask_loss`` builds (anchors, H, W) tensors for an image's positive anchors and keeps two
    of them for the backward pass: with 300 cells an image has ~2,000 positive anchors, i.e. ~400 MB per image at
    imgsz 640. The loss of an anchor only sees the pixels inside its box, so this computes it on chunks of anchors
    restricted to the rows their boxes span, and forms the gradients (``sigmoid(z) - y`` per pixel) in the same pass;
    only (anchors, 32) and (32, H, W) gradients are kept. Values and gradients equal Ultralytics' up to float
    rounding (summation order); the arithmetic runs in float32 also under autocast.

    ``forward(coef (n, 32), proto (32, H, W), gt_masks, gt_ids (n,), boxes (n, 4), area (n,), overlap, grad)``:
    ``gt_masks`` is the image's (H, W) instance map (``overlap``: pixel value k+1 is instance k) or its (m, H, W)
    binary masks; ``gt_ids`` the instance of each anchor; ``boxes`` xyxy in mask px; ``area`` the normalized box
    area; ``grad``: form the gradients (pass ``torch.is_grad_enabled()``: validation needs none). Returns the
    scalar ``sum_a mean_HxW(crop(BCE(coef_a @ proto, gt_a), box_a)) / area_a``.
    """

    #: elements (anchors x pixels) per chunk: ~16 MB per float32 temporary
    CHUNK_ELEMENTS = 1 << 22

    @staticmethod
    def forward(ctx, coef, proto, gt_masks, gt_ids, boxes, area, overlap: bool, grad: bool = True):  # noqa: D102
        n, h, w = coef.shape[0], proto.shape[-2], proto.shape[-1]
        # (inside forward grad mode is always off; ``grad`` says whether the caller's was on)
        need_coef, need_proto = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        with torch.autocast(coef.device.type, enabled=False):
            p = proto.float()
            c = coef.float()
            boxes = boxes.float()
            scale = 1.0 / (area.float() * (h * w))  # mean over HxW, divided by the area
            # chunks of anchors sorted by box top, so each chunk's boxes span few rows
            order = torch.argsort(boxes[:, 1], stable=True)
            total = p.new_zeros(())
            grad_coef = torch.zeros_like(c) if need_coef else None
            grad_proto = torch.zeros_like(p) if need_proto else None
            cols = torch.arange(w, device=p.device, dtype=boxes.dtype)
            chunk = max(1, CroppedMaskLoss.CHUNK_ELEMENTS // (h * w))
            for start in range(0, n, chunk):
                idx = order[start : start + chunk]
                b = boxes[idx]
                # rows any box of the chunk covers: Ultralytics' crop keeps rows r with y1 <= r < y2
                r0 = int(b[:, 1].min().clamp(0, h).ceil())
                r1 = int(b[:, 3].max().clamp(0, h).ceil())
                if r1 <= r0:
                    continue
                rows = torch.arange(r0, r1, device=p.device, dtype=boxes.dtype)
                inside = ((cols >= b[:, 0:1]) & (cols < b[:, 2:3]))[:, None, :] & (
                    (rows >= b[:, 1:2]) & (rows < b[:, 3:4])
                )[:, :, None]  # (k, rows, w)
                pr = p[:, r0:r1].reshape(p.shape[0], -1)  # (32, rows*w)
                z = c[idx] @ pr  # (k, rows*w)
                if overlap:
                    y = (gt_masks[r0:r1].reshape(1, -1) == (gt_ids[idx] + 1)[:, None]).float()
                else:
                    y = gt_masks[gt_ids[idx], r0:r1].reshape(len(idx), -1).float()
                weight = inside.reshape(len(idx), -1) * scale[idx, None]
                bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
                total = total + (bce * weight).sum()
                if need_coef or need_proto:
                    dz = (torch.sigmoid(z) - y) * weight  # d loss / d logit
                    if need_coef:
                        grad_coef[idx] = dz @ pr.T
                    if need_proto:
                        grad_proto[:, r0:r1] += (c[idx].T @ dz).view(p.shape[0], r1 - r0, w)
        ctx.save_for_backward(grad_coef, grad_proto)
        ctx.dtypes = (coef.dtype, proto.dtype)
        return total  # float32, as Ultralytics' BCE gives under autocast

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_coef, grad_proto = ctx.saved_tensors
        g = grad_out.float()
        gc = (grad_coef * g).to(ctx.dtypes[0]) if grad_coef is not None else None
        gp = (grad_proto * g).to(ctx.dtypes[1]) if grad_proto is not None else None
        return gc, gp, None, None, None, None, None, None


@functools.cache
def _chunked_segmentation_loss_class() -> type:
    """Ultralytics' ``v8SegmentationLoss`` with its per-image mask loss replaced by :class:`CroppedMaskLoss`."""
    from ultralytics.utils.loss import v8SegmentationLoss
    from ultralytics.utils.ops import xyxy2xywh

    class ChunkedSegmentationLoss(v8SegmentationLoss):
        """Same loss as ``v8SegmentationLoss`` (8.4), with memory independent of the number of cells per image.

        An image whose positive anchors times mask pixels stay under ``DIRECT_ELEMENTS`` (32 MB per float32
        temporary, two kept for the backward pass; e.g. 1,300 anchors at imgsz 320, 320 at 640, about 10 per cell)
        takes Ultralytics' own per-image loss, which is faster there; denser images take :class:`CroppedMaskLoss`.
        """

        DIRECT_ELEMENTS = 1 << 23

        def calculate_segmentation_loss(
            self, fg_mask, masks, target_gt_idx, target_bboxes, batch_idx, proto, pred_masks, imgsz
        ) -> torch.Tensor:
            # mirrors v8SegmentationLoss.calculate_segmentation_loss of Ultralytics 8.4.190 line by line
            _, _, mask_h, mask_w = proto.shape
            loss = 0
            target_bboxes_normalized = target_bboxes / imgsz[[1, 0, 1, 0]]
            marea = xyxy2xywh(target_bboxes_normalized)[..., 2:].prod(2)
            mxyxy = target_bboxes_normalized * torch.tensor([mask_w, mask_h, mask_w, mask_h], device=proto.device)
            for i, (fg_mask_i, target_gt_idx_i, pred_masks_i, proto_i, mxyxy_i, marea_i) in enumerate(
                zip(fg_mask, target_gt_idx, pred_masks, proto, mxyxy, marea)
            ):
                if fg_mask_i.any():
                    gt = masks[i] if self.overlap else masks[batch_idx.view(-1) == i]
                    idx = target_gt_idx_i[fg_mask_i]
                    if int(fg_mask_i.sum()) * mask_h * mask_w <= self.DIRECT_ELEMENTS:
                        # few anchors: Ultralytics' own per-image loss is faster and its tensors are small
                        gt_mask = (gt == (idx + 1).view(-1, 1, 1)).float() if self.overlap else gt[idx]
                        loss += self.single_mask_loss(
                            gt_mask, pred_masks_i[fg_mask_i], proto_i, mxyxy_i[fg_mask_i], marea_i[fg_mask_i]
                        )
                        continue
                    loss += CroppedMaskLoss.apply(
                        pred_masks_i[fg_mask_i], proto_i, gt, idx, mxyxy_i[fg_mask_i],
                        marea_i[fg_mask_i], self.overlap, torch.is_grad_enabled(),
                    )
                else:  # (as Ultralytics: every output takes part in the graph, for DDP)
                    loss += (proto * 0).sum() + (pred_masks * 0).sum()
            return loss / fg_mask.sum()

    return ChunkedSegmentationLoss


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
        names = {int(k): str(v) for k, v in (hp.get("class_names") or {}).items()}
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
        names = {int(k): str(v) for k, v in dict(getattr(net, "names", {}) or {}).items()}
        train_args = ckpt.get("train_args") or {}
        hparams = dict(train_args)
        info = {"imgsz": hparams.get("imgsz"), "data": hparams.get("data"), "hparams": hparams, "source": "pt"}
    else:
        raise _error(flag, f"{path}: expected a cellseg_pl .ckpt or an Ultralytics .pt")
    if not names:
        names = {i: str(i) for i in range(int(net.model[-1].nc))}
    net.names = names
    return net.eval(), names, info
