"""LightningModule: the YOLOv8-seg network, its loss, Ultralytics' optimization recipe, mask metrics.

Lightning owns the loop; this module uses manual optimization only because Ultralytics' recipe needs control that
automatic optimization does not give: gradient accumulation that ramps up during warmup, per-iteration lr and
momentum warmup, and an EMA updated after each optimizer step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from cellseg_pl.inference import Window, instances_from
from cellseg_pl.metrics import CellMatchMetrics, mask_map_metric, targets_from_batch
from cellseg_pl.model import attach_loss, build_network, network_yaml, split_outputs
from cellseg_pl.optim import EMA, build_optimizer, resolve_optimizer, schedule, warmup_iterations
from cellseg_pl.postprocess import postprocess

log = logging.getLogger(__name__)

LOSS_NAMES = ("box_loss", "seg_loss", "cls_loss", "dfl_loss")


def mask_fitness(map50: torch.Tensor, map50_95: torch.Tensor) -> torch.Tensor:
    """The best-model rule: 0.1 * mask mAP50 + 0.9 * mask mAP50-95 (Ultralytics 8.0-8.3's weighting, on masks
    alone). Ultralytics 8.4 picks by box mAP50-95 + mask mAP50-95; for cells the masks are the product, so box
    mAP does not vote here."""
    return 0.1 * map50 + 0.9 * map50_95


class CellSegModule(L.LightningModule):
    """YOLOv8-seg on Lightning; knobs carry Ultralytics' names and defaults.

    The arguments come in five groups, in this order (flat, so that ``--model.lr0``, the configs and the
    hyper-parameters stored in every checkpoint keep Ultralytics' names):

    * network: ``model``, ``reinit_head`` (``num_classes``, ``class_names`` and ``overlap_mask`` are linked from
      the data; ``model_yaml`` is filled in by the module itself);
    * optimizer recipe: ``optimizer`` ... ``grad_clip``, and the weight average ``ema`` ... ``ema_tau``;
    * loss gains: ``box``, ``cls``, ``dfl``;
    * validation and prediction: ``conf``, ``iou``, ``max_det``, ``pr_conf``, ``min_area``, ``predict_conf``;
    * safety: ``max_nonfinite``.

    Args:
        model: model yaml to train from scratch (``yolov8n-seg.yaml``, ``yolov8s-seg.yaml`` or a path), or weights
            to fine-tune: an Ultralytics ``.pt`` (e.g. the lab's ``yolov8s_cells_v1.0.pt``; a pickle: load only
            files you trust) or a cellseg_pl ``.ckpt`` (its EMA weights; read safely, weights only).
        num_classes: number of classes (linked from the data; set once in ``dataset.yaml``).
        class_names: class index -> name (linked from the data).
        reinit_head: when a ``.pt`` was trained for another number of classes, start a new head instead of failing.
        optimizer: ``SGD``, ``Adam``, ``AdamW`` or ``auto`` (AdamW with an lr fitted to the class count for short
            runs, SGD lr 0.01 for runs over 10,000 iterations; ``auto`` ignores ``lr0``, as Ultralytics does).
        lr0: initial learning rate.
        lrf: final learning rate as a fraction of ``lr0``.
        momentum: SGD momentum / Adam beta1.
        weight_decay: weight decay of conv/linear weights, scaled by ``batch * accumulate / nbs``.
        warmup_epochs: warmup length in epochs (fractions allowed).
        warmup_momentum: momentum at the start of warmup.
        warmup_bias_lr: bias learning rate at the start of warmup.
        cos_lr: cosine instead of linear lr decay.
        nbs: nominal batch size: gradients are accumulated over ``nbs / (batch_size * devices)`` batches.
        grad_clip: gradient norm clipping (Ultralytics clips at 10).
        ema: validate, select and export an exponential moving average of the weights.
        ema_decay: maximum EMA decay.
        ema_tau: EMA ramp time constant, in optimizer steps.
        box: box loss gain.
        cls: classification loss gain.
        dfl: distribution focal loss gain.
        overlap_mask: mask targets as one instance map per image (linked from the data).
        conf: validation NMS confidence threshold (low, for mAP).
        iou: NMS IoU threshold.
        max_det: maximum detections per image (>= 300 for dense cell images).
        pr_conf: confidence at which precision, recall and F1 are reported.
        min_area: a false positive smaller than this (px of the original image) is counted in
            ``metrics/FP_droplet_sized`` (the guide's water-droplet rule: 500 px).
        predict_conf: confidence threshold of the ``predict`` sub-command.
        max_nonfinite: a NaN/Inf loss or gradient skips its step with a warning; this many in a row stop training.
        model_yaml: network definition stored in checkpoints so they reload without the original ``.pt``;
            filled in automatically, leave unset.
    """

    def __init__(
        self,
        model: str = "yolov8n-seg.yaml",
        num_classes: int = 1,
        class_names: dict[int, str] | None = None,
        reinit_head: bool = False,
        optimizer: str = "auto",
        lr0: float = 0.01,
        lrf: float = 0.01,
        momentum: float = 0.937,
        weight_decay: float = 0.0005,
        warmup_epochs: float = 3.0,
        warmup_momentum: float = 0.8,
        warmup_bias_lr: float = 0.1,
        cos_lr: bool = False,
        nbs: int = 64,
        grad_clip: float = 10.0,
        ema: bool = True,
        ema_decay: float = 0.9999,
        ema_tau: float = 2000.0,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        overlap_mask: bool = True,
        conf: float = 0.001,
        iou: float = 0.7,
        max_det: int = 300,
        pr_conf: float = 0.25,
        min_area: float = 500.0,
        predict_conf: float = 0.25,
        max_nonfinite: int = 5,
        model_yaml: dict | None = None,
    ) -> None:
        super().__init__()
        resolve_optimizer(optimizer, lr0, momentum, num_classes, 0)  # fail at construction on a bad name
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = build_network(model, num_classes, class_names, reinit_head, model_yaml)
        self.hparams["model_yaml"] = network_yaml(self.net)
        self.hparams["class_names"] = dict(self.net.names)
        self.ema = EMA(self.net, ema_decay, ema_tau) if ema else None
        self.val_map = mask_map_metric(pred_masks_in_boxes=True)  # postprocess crops every mask to its box
        self.val_match = CellMatchMetrics(conf=pr_conf, min_area=min_area)
        self._criterion = None
        self._criterion_device: torch.device | None = None
        self._last_opt_step = -1
        self._accumulate = 1
        self._accumulate_now = 1  # this iteration's (ramped during warmup)
        self._nw = 0
        self._nonfinite = 0

    # ------------------------------------------------------------------ helpers
    @property
    def class_names(self) -> dict[int, str]:
        return dict(self.net.names)

    @property
    def eval_net(self) -> torch.nn.Module:
        """The weights used for validation, best-model selection and export: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.net

    def criterion(self, preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        if self._criterion is None or self._criterion_device != self.device:
            h = self.hparams
            self._criterion = attach_loss(self.net, h.box, h.cls, h.dfl, h.overlap_mask)
            self._criterion_device = self.device
        return self._criterion(preds, batch)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch["img"] = batch["img"].float() / 255.0
        return batch

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        trainer = self.trainer
        if not trainer.max_epochs or trainer.max_epochs < 1:
            raise ValueError("--trainer.max_epochs: set a positive number of epochs (the lr schedule needs it)")
        trainer.estimated_stepping_batches  # noqa: B018 - sets up the train loader so its size is known
        loader = trainer.train_dataloader
        batch_total = loader.batch_size * trainer.world_size
        n_images = len(loader.dataset)
        nb = trainer.num_training_batches
        self._accumulate = min(max(round(h.nbs / batch_total), 1), max(nb * trainer.max_epochs, 1))
        weight_decay = h.weight_decay * batch_total * self._accumulate / h.nbs
        iterations = math.ceil(n_images / max(batch_total, h.nbs)) * trainer.max_epochs
        name, lr, momentum = resolve_optimizer(h.optimizer, h.lr0, h.momentum, h.num_classes, iterations)
        if h.optimizer.lower() == "auto":
            log.info("optimizer=auto: ignoring lr0=%g, using %s(lr=%g, momentum=%g)", h.lr0, name, lr, momentum)
            self._warmup_bias_lr = 0.0
        else:
            self._warmup_bias_lr = h.warmup_bias_lr
        self._momentum = momentum
        self._nw = warmup_iterations(h.warmup_epochs, trainer.max_epochs, nb)
        return build_optimizer(self.net, name, lr, momentum, weight_decay)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        opt = self.optimizers()
        nb = self.trainer.num_training_batches
        ni = batch_idx + nb * self.current_epoch
        accumulate = schedule(
            opt.optimizer, ni, self.current_epoch, self.trainer.max_epochs, self._nw, self._accumulate,
            h.lrf, h.cos_lr, self._momentum, h.warmup_momentum, self._warmup_bias_lr,
        )
        self._accumulate_now = accumulate
        loss, parts = self.criterion(self.net(batch["img"]), batch)
        if not torch.isfinite(loss):
            self._skip_nonfinite(f"loss {loss.item()}", batch_idx)
            # every process must still run a backward (DDP), one that changes nothing
            self.manual_backward(sum((p * 0).sum() for p in self.net.parameters()))
            return None
        # DDP averages gradients over processes; Ultralytics scales the loss by world size to keep sums.
        self.manual_backward(loss * self.trainer.world_size)
        if ni - self._last_opt_step >= accumulate:
            if h.grad_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=h.grad_clip, gradient_clip_algorithm="norm")
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is None and not self._finite_gradients():
                # (with a 16-bit grad scaler, the scaler itself skips such steps and lowers its scale)
                self._skip_nonfinite("gradient", batch_idx)
                opt.zero_grad(set_to_none=True)
                self._last_opt_step = ni
                return None
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._last_opt_step = ni
            if self.ema is not None:
                self.ema.update(self.net)
        self._nonfinite = 0
        bs = batch["img"].shape[0]
        self.log_dict({f"train/{k}": parts[k] for k in LOSS_NAMES}, on_step=False, on_epoch=True, batch_size=bs)
        self.log("loss", loss.detach() / bs, prog_bar=True, on_step=True, on_epoch=False, logger=False, batch_size=bs)
        if batch_idx == nb - 1:  # the lr of the epoch's last batch, as Ultralytics reports it
            for i, group in enumerate(opt.optimizer.param_groups):
                self.log(f"lr/pg{i}", group["lr"], on_step=False, on_epoch=True, batch_size=bs)
        return loss.detach()

    def _finite_gradients(self) -> bool:
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        # one fused norm over all gradients: finite when every gradient is (and none is beyond ~1e19)
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True

    def _skip_nonfinite(self, what: str, batch_idx: int) -> None:
        """Skip one step with a warning; stop with a clear error after ``max_nonfinite`` in a row."""
        self._nonfinite += 1
        log.warning(
            "epoch %d, batch %d: non-finite %s, step skipped (%d in a row)",
            self.current_epoch, batch_idx, what, self._nonfinite,
        )
        if self._nonfinite >= self.hparams.max_nonfinite:
            raise FloatingPointError(
                f"training stopped at epoch {self.current_epoch}, batch {batch_idx}: {self._nonfinite} non-finite "
                f"losses/gradients in a row; lower --model.lr0, check the data, or train with --trainer.precision 32"
            )

    def on_train_epoch_start(self) -> None:
        self._last_opt_step = min(self._last_opt_step, self.trainer.num_training_batches * self.current_epoch - 1)

    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradients accumulated towards the next optimizer step through validation.

        Lightning's default releases them before every validation. Accumulation to the nominal batch runs across
        epoch ends (as in Ultralytics' trainer, which validates without touching them), so that default threw away
        the batches since the last step at every epoch end: with 20 images, batch 4 and ``nbs`` 64 (5 batches an
        epoch, a step every 16) every step saw at most 5 of its 16 batches, and the run trained worse than Ultralytics
        on the same batches (test mask mAP50-95 0.63 against 0.71 on HeLa tiles).
        """

    def on_train_start(self) -> None:
        pending, self._pending_grads = getattr(self, "_pending_grads", None), None
        if pending:  # a resumed run continues the accumulation the checkpoint was saved in (see on_save_checkpoint)
            for name, p in self.net.named_parameters():
                if name in pending:
                    p.grad = pending[name].to(device=p.device, dtype=p.dtype)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cellseg_last_opt_step"] = self._last_opt_step
        # the gradients accumulated since the last optimizer step: the next step needs them, so resume is exact
        pending = {n: p.grad.detach().cpu() for n, p in self.net.named_parameters() if p.grad is not None}
        if pending:
            checkpoint["cellseg_pending_grads"] = pending

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last_opt_step = checkpoint.get("cellseg_last_opt_step", -1)
        self._pending_grads = checkpoint.get("cellseg_pending_grads")

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], prefix: str) -> dict[str, list]:
        """Loss and metrics of one batch; returns its ``preds`` and ``targets`` (network-input px) for callbacks."""
        h = self.hparams
        det, proto, raw = split_outputs(self.eval_net(batch["img"]))
        _, parts = self.criterion(raw, batch)
        bs = batch["img"].shape[0]
        self.log_dict({f"{prefix}/{k}": parts[k] for k in LOSS_NAMES}, on_epoch=True, batch_size=bs, sync_dist=True)
        preds = postprocess(det, proto, h.num_classes, h.conf, h.iou, h.max_det)
        targets = targets_from_batch(batch)
        self.val_map.update(
            [{k: p[k] for k in ("boxes", "scores", "labels", "masks")} for p in preds],
            [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets],
        )
        # masks are at network-input scale: droplet areas (original px) scale by the letterbox gain squared
        self.val_match.update(preds, targets, [gain**2 for gain, _ in batch["ratio_pad"]])
        return {"preds": preds, "targets": targets}

    def _log_metrics(self) -> None:
        m = self.val_map.compute()
        c = self.val_match.compute()
        self.val_map.reset()
        self.val_match.reset()
        values = {
            "metrics/precision(M)": c["precision"],
            "metrics/recall(M)": c["recall"],
            "metrics/mAP50(M)": m["segm_map_50"],
            "metrics/mAP50-95(M)": m["segm_map"],
            "metrics/mAP50(B)": m["bbox_map_50"],
            "metrics/mAP50-95(B)": m["bbox_map"],
            "metrics/F1(M)": c["f1"],
            "metrics/AP_cell(M)": c["ap_cell"],
            "metrics/mean_matched_IoU(M)": c["mean_matched_iou"],
            "metrics/count_MAE": c["count_mae"],
            "metrics/count_MRE": c["count_mre"],
            "metrics/FP_droplet_sized": c["fp_droplet_sized"],
        }
        values = {k: v.float().clamp(min=0) for k, v in values.items()}
        values["fitness"] = mask_fitness(values["metrics/mAP50(M)"], values["metrics/mAP50-95(M)"])
        self.log_dict(values)
        self.log("mAP50(M)", values["metrics/mAP50(M)"], prog_bar=True, logger=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list]:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``im_file``, ``ori_shape`` and its detections as ``cellseg_pl.inference.Instance`` objects at the
        original resolution (masks rebuilt from the prototypes at full size, cropped to each object)."""
        h = self.hparams
        det, proto, _ = split_outputs(self.eval_net(batch["img"]))
        results = postprocess(det, proto, h.num_classes, h.predict_conf, h.iou, h.max_det, with_masks=False)
        size = tuple(batch["img"].shape[-2:])
        out = []
        for i, r in enumerate(results):
            shape = tuple(int(v) for v in batch["ori_shape"][i])
            found = instances_from(r, proto[i], size, Window(i, 0, 0, 0, shape))
            out.append({"im_file": batch["im_file"][i], "ori_shape": shape, "instances": found})
        return out
