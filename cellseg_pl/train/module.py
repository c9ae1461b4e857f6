"""LightningModule: a YOLO-seg network (YOLOv8, 11, 12 or 26), its family's loss, Ultralytics' optimization recipe, mask metrics.

Lightning owns the loop; this module uses manual optimization only because Ultralytics' recipe needs control that
automatic optimization does not give: gradient accumulation that ramps up during warmup, per-iteration lr and
momentum warmup, and an EMA updated after each optimizer step.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from cellseg_pl.errors import UsageError
from cellseg_pl.infer.options import InferenceOptions
from cellseg_pl.metrics import ValidationMetrics
from cellseg_pl.yolo.loss import attach_loss
from cellseg_pl.yolo.network import build_network, network_yaml, split_outputs
from cellseg_pl.train.recipe import EMA, Recipe
from cellseg_pl.yolo.postprocess import postprocess

log = logging.getLogger(__name__)

class CellSegModule(L.LightningModule):
    """A YOLO-seg network on Lightning; knobs carry Ultralytics' names and defaults.

    The arguments are flat, so that ``--model.lr0``, the configs and the hyper-parameters stored in every checkpoint
    keep Ultralytics' names: the network, the optimizer recipe (:class:`~cellseg_pl.train.recipe.Recipe`) and the
    weight average, the loss gains, validation (``iou``, ``max_det`` and ``pr_conf`` default to ``predict``'s
    settings, :class:`~cellseg_pl.infer.options.InferenceOptions`), and the non-finite guard.

    Args:
        model: model yaml to train from scratch (``yolov8n-seg.yaml``, ``yolo11s-seg.yaml``, ``yolo26n-seg.yaml`` or a
            path), or weights
            to fine-tune: an Ultralytics ``.pt`` (e.g. the lab's ``yolov8s_cells_v1.0.pt``; a pickle: load only
            files you trust) or a cellseg_pl ``.ckpt`` (its EMA weights; read safely, weights only).
        num_classes: number of classes (linked from the data; set once in ``dataset.yaml``).
        class_names: class index -> name (linked from the data).
        reinit_head: when a ``.pt`` was trained for another number of classes, start a new head instead of failing.
        optimizer: ``SGD``, ``Adam``, ``AdamW``, ``MuSGD`` or ``auto`` (AdamW with an lr fitted to the class count
            for short runs, Ultralytics' MuSGD at lr 0.01 for runs over 10,000 iterations; ``auto`` ignores ``lr0``,
            as Ultralytics does).
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
        dfl: distribution focal loss gain (YOLO26, whose boxes have no DFL: the gain of its L1 box-distance loss).
        overlap_mask: mask targets as one instance map per image (linked from the data).
        conf: validation NMS confidence threshold (low, for mAP).
        iou: validation NMS IoU threshold (``predict``'s by default).
        max_det: maximum detections per validation image (``predict``'s by default; >= 300 for dense cell images).
        pr_conf: confidence at which precision, recall and F1 are reported (``predict``'s ``conf`` by default).
        min_area: a false positive smaller than this (px of the original image) is counted in
            ``metrics/FP_droplet_sized`` (the guide's water-droplet rule: 500 px).
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
        iou: float = InferenceOptions.iou,
        max_det: int = InferenceOptions.max_det,
        pr_conf: float = InferenceOptions.conf,
        min_area: float = 500.0,
        max_nonfinite: int = 5,
        model_yaml: dict | None = None,
    ) -> None:
        super().__init__()
        self.recipe = Recipe(optimizer, lr0, lrf, momentum, weight_decay, warmup_epochs, warmup_momentum,
                             warmup_bias_lr, cos_lr, nbs, num_classes, max_nonfinite)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = build_network(model, num_classes, class_names, reinit_head, model_yaml)
        self.hparams["model_yaml"] = network_yaml(self.net)
        self.hparams["class_names"] = dict(self.net.names)
        self.ema = EMA(self.net, ema_decay, ema_tau) if ema else None
        self.metrics = ValidationMetrics(pr_conf, min_area)
        self._criterion = None
        self._criterion_device: torch.device | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def class_names(self) -> dict[int, str]:
        return dict(self.net.names)

    @property
    def eval_net(self) -> torch.nn.Module:
        """The weights used for validation, best-model selection and export: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.net

    def criterion(self, preds: dict[str, torch.Tensor], batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        """The network family's loss in the current epoch: ``(loss, parts)``, ``parts`` named as ``results.csv``."""
        if self._criterion is None or self._criterion_device != self.device:
            h = self.hparams
            epochs = getattr(self._trainer, "max_epochs", None) or 100
            self._criterion = attach_loss(self.net, h.box, h.cls, h.dfl, h.overlap_mask, epochs=epochs)
            self._criterion_device = self.device
        return self._criterion(preds, batch, epoch=self.current_epoch)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch["img"] = batch["img"].float() / 255.0
        return batch

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainer = self.trainer
        if not trainer.max_epochs or trainer.max_epochs < 1:
            raise UsageError("--trainer.max_epochs: set a positive number of epochs (the lr schedule needs it)")
        trainer.estimated_stepping_batches  # noqa: B018 - sets up the train loader so its size is known
        loader = trainer.train_dataloader
        return self.recipe.build(self.net, loader.batch_size * trainer.world_size, len(loader.dataset),
                                 trainer.num_training_batches, trainer.max_epochs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        nb = self.trainer.num_training_batches
        ni = batch_idx + nb * self.current_epoch
        self.recipe.schedule(opt.optimizer, ni, self.current_epoch)
        loss, parts = self.criterion(self.net(batch["img"]), batch)
        if not torch.isfinite(loss):
            self.recipe.nonfinite(f"loss {loss.item()}", self.current_epoch, batch_idx)
            # every process must still run a backward (DDP), one that changes nothing
            self.manual_backward(sum((p * 0).sum() for p in self.net.parameters()))
            return None
        # DDP averages gradients over processes; Ultralytics scales the loss by world size to keep sums.
        self.manual_backward(loss * self.trainer.world_size)
        if not self.recipe.step(self, opt, ni, self.current_epoch, batch_idx):
            return None
        self.recipe.finite()
        bs = batch["img"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=False, on_epoch=True, batch_size=bs)
        self.log("loss", loss.detach() / bs, prog_bar=True, on_step=True, on_epoch=False, logger=False, batch_size=bs)
        if batch_idx == nb - 1:  # the lr of the epoch's last batch, as Ultralytics reports it
            for i, group in enumerate(opt.optimizer.param_groups):
                self.log(f"lr/pg{i}", group["lr"], on_step=False, on_epoch=True, batch_size=bs)
        return loss.detach()

    def on_train_epoch_start(self) -> None:
        self.recipe.epoch_start(self.trainer.num_training_batches, self.current_epoch)

    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradients accumulated towards the next optimizer step through validation, as Ultralytics does.

        (Lightning's default released them: with 20 images, batch 4 and ``nbs`` 64 every step saw at most 5 of its 16
        batches, and HeLa test mask mAP50-95 fell from 0.71 to 0.63.)"""

    def on_train_start(self) -> None:
        self.recipe.restore_gradients(self.net)  # a resumed run continues the accumulation it was saved in

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.recipe.save(checkpoint, self.net)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.recipe.load(checkpoint)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], prefix: str) -> dict[str, list]:
        """Loss and metrics of one batch; returns its ``preds`` and ``targets`` (network-input px) for callbacks."""
        h = self.hparams
        det, proto, raw = split_outputs(self.eval_net(batch["img"]))
        _, parts = self.criterion(raw, batch)
        bs = batch["img"].shape[0]
        self.log_dict({f"{prefix}/{k}": v for k, v in parts.items()}, on_epoch=True, batch_size=bs, sync_dist=True)
        preds = postprocess(det, proto, h.num_classes, h.conf, h.iou, h.max_det, masks="windows")
        return {"preds": preds, "targets": self.metrics.update(preds, batch)}

    def _log_metrics(self) -> None:
        values = self.metrics.compute()
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
