"""The training loss of a YOLO-seg network: Ultralytics' own criterion per family, with a memory-bounded mask loss.

:func:`attach_loss` gives the network the attribute namespace Ultralytics' loss reads (``model.args``) and returns
the :class:`Criterion` the ``LightningModule`` calls: YOLOv8/11/12's ``v8SegmentationLoss``, or YOLO26's end-to-end
``E2ELoss(SegmentLoss26)`` with its per-epoch branch weights. Ultralytics is imported inside functions: importing this module does
nothing.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from cellseg_pl.yolo.network import ultralytics_defaults


def attach_loss(
    net: nn.Module,
    box: float = 7.5,
    cls: float = 0.5,
    dfl: float = 1.5,
    overlap_mask: bool = True,
    chunked_mask_loss: bool = True,
    epochs: int = 100,
) -> "Criterion":
    """Give the network the attribute namespace its loss reads and return the criterion of its family.

    The criterion captures the network's device when built: call this after the network is on its device.

    Args:
        chunked_mask_loss: compute the mask part of Ultralytics' loss with :class:`CroppedMaskLoss` (the same value and
            gradients, memory bounded whatever the number of cells per image); False: Ultralytics' own, whose memory
            grows with cells per image times (mask side)^2 (Ultralytics issues #17961, #14812).
        epochs: the run's length; an end-to-end head (YOLO26) shifts its loss from the one-to-many to the one-to-one
            branch over it.

    Returns:
        A :class:`Criterion`.
    """
    from ultralytics.nn.modules.head import Segment26
    from ultralytics.utils.loss import E2ELoss, SegmentLoss26, v8SegmentationLoss

    args = {**ultralytics_defaults(), "box": box, "cls": cls, "dfl": dfl, "overlap_mask": overlap_mask,
            "epochs": epochs}
    net.args = SimpleNamespace(**args)
    head = net.model[-1]
    base = SegmentLoss26 if isinstance(head, Segment26) else v8SegmentationLoss
    loss_class = _chunked_segmentation_loss_class(base) if chunked_mask_loss else base
    # an end-to-end head trains both branches, as Ultralytics' ``SegmentationModel.init_criterion``
    loss = E2ELoss(net, loss_class) if getattr(head, "one2one_cv2", None) is not None else loss_class(net)
    names = (loss.one2one if isinstance(loss, E2ELoss) else loss).loss_names
    # YOLOv8/11/12: box_loss seg_loss cls_loss dfl_loss (their sem_loss is always 0: no semantic branch);
    # YOLO26 (reg_max 1): box_loss seg_loss cls_loss l1_loss sem_loss
    return Criterion(loss, tuple(n for n in names if n != "sem_loss" or base is SegmentLoss26))


class Criterion:
    """``criterion(preds, batch, epoch=0) -> (loss, parts)``: a network family's training loss.

    ``loss`` is the weighted sum times the batch size (Ultralytics' convention); ``parts`` maps :attr:`names` to
    detached scalars (an end-to-end head reports its one-to-one branch, as Ultralytics does).

    End-to-end heads (YOLO26) weigh the one-to-many branch by 0.8 in the first epoch, falling linearly to 0.1 in the
    last, and the one-to-one branch by the rest. Ultralytics keeps that weight as a counter that its trainer steps
    once per epoch (and rebuilds on resume); here it is computed from ``epoch`` at every call, so a resumed run, or
    any process of a DDP run, uses the weight of the epoch it is in, with no state to save.
    """

    def __init__(self, loss: Any, names: tuple[str, ...]) -> None:
        self.loss = loss
        self.names = names
        self.end_to_end = hasattr(loss, "one2one")

    def one_to_many_weight(self, epoch: int) -> float:
        """The one-to-many branch's weight in ``epoch`` (0-based); 1.0 for heads with one branch."""
        return float(self.loss.decay(epoch)) if self.end_to_end else 1.0

    def __call__(self, preds: dict[str, Any], batch: dict[str, Any], epoch: int = 0) -> tuple[torch.Tensor, dict]:
        if self.end_to_end:
            # Ultralytics' E2ELoss after ``epoch`` calls of its ``update()``
            self.loss.updates = epoch
            self.loss.o2m = self.loss.decay(epoch)
            self.loss.o2o = max(self.loss.total - self.loss.o2m, 0)
            batch = {**batch, "sem_masks": semantic_targets(batch, self.loss.one2many.overlap)}
        total, parts = self.loss(preds, batch)
        return total.sum(), {k: parts[k] for k in self.names}


def semantic_targets(batch: dict[str, Any], overlap: bool) -> torch.Tensor:
    """(B, H, W) class index of the instance covering each mask pixel (0 where none), as Ultralytics' ``Format``.

    YOLO26's semantic-mask loss reads it as ``batch["sem_masks"]`` and ignores uncovered pixels. ``batch["masks"]``
    is (B, H, W) instance maps (``overlap``: value k+1 is the image's k-th instance) or (N, H, W) binary masks of
    every instance, in batch order; where binary masks overlap, the smallest instance wins.
    """
    masks = batch["masks"]
    cls = batch["cls"].view(-1).long().to(masks.device)
    batch_idx = batch["batch_idx"].view(-1).long().to(masks.device)
    bs = int(batch["img"].shape[0])
    if overlap:
        out = torch.zeros(masks.shape, dtype=torch.long, device=masks.device)
        for i in range(bs):
            classes = cls[batch_idx == i]
            if len(classes):
                ids = masks[i].long()
                out[i] = torch.where(ids > 0, classes[(ids - 1).clamp(0, len(classes) - 1)], 0)
        return out.float()
    out = torch.zeros((bs, *masks.shape[-2:]), dtype=torch.long, device=masks.device)
    for i in range(bs):
        own = masks[batch_idx == i] > 0.5
        if len(own):
            area = own.flatten(1).sum(1)
            key = torch.where(own, area[:, None, None], area.max() + 1)
            out[i] = cls[batch_idx == i][key.min(0).indices] * own.any(0)
    return out.float()


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


def _chunked_segmentation_loss_class(base: type | None = None) -> type:
    """Ultralytics' segmentation loss ``base`` (``v8SegmentationLoss`` by default, or YOLO26's ``SegmentLoss26``,
    which shares its mask loss) with its per-image mask loss replaced by :class:`CroppedMaskLoss`; one class each."""
    from ultralytics.utils.loss import v8SegmentationLoss

    return _chunked_class(base or v8SegmentationLoss)


@functools.cache
def _chunked_class(base: type) -> type:
    from ultralytics.utils.ops import xyxy2xywh

    class ChunkedSegmentationLoss(base):
        """Same loss as ``base`` (8.4), with memory independent of the number of cells per image.

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
