"""Optimization as Ultralytics' trainer does it: parameter groups, warmup, lr decay, accumulation, weight EMA.

Everything here is a pure function of (epoch, iteration) or a small state that lives in the LightningModule's
checkpoint, so resuming from a Lightning checkpoint restores the schedule exactly.
"""

from __future__ import annotations

import logging
import math
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from torch import nn

from cellseg_pl.errors import UsageError

log = logging.getLogger(__name__)

#: Optimizers cellseg_pl builds (Ultralytics also has Adamax, NAdam, RAdam, RMSProp).
OPTIMIZERS = ("SGD", "Adam", "AdamW", "MuSGD", "auto")

#: MuSGD's weights of its Muon and SGD updates on the matrix and filter groups (Ultralytics 8.4's ``build_optimizer``).
MUSGD_MUON, MUSGD_SGD = 0.2, 1.0


def resolve_optimizer(name: str, lr0: float, momentum: float, num_classes: int, iterations: float) -> tuple[str, float, float]:
    """Ultralytics' ``optimizer=auto`` rule: AdamW with a class-count-fitted lr for short runs, MuSGD for long ones.

    Args:
        name: ``SGD``, ``Adam``, ``AdamW``, ``MuSGD`` or ``auto`` (case-insensitive).
        lr0: the configured initial lr (ignored by ``auto``, as in Ultralytics).
        momentum: the configured momentum (``auto`` uses 0.9).
        num_classes: number of classes.
        iterations: ``ceil(n_train_images / max(batch, nbs)) * epochs``.

    Returns:
        ``(name, lr0, momentum)`` actually used.
    """
    canonical = {o.lower(): o for o in OPTIMIZERS}.get(str(name).lower())
    if canonical is None:
        raise UsageError(f"--model.optimizer: '{name}' is not one of {', '.join(OPTIMIZERS)}")
    if canonical != "auto":
        return canonical, lr0, momentum
    if iterations > 10000:  # (Ultralytics 8.4 picks MuSGD for every model family)
        return "MuSGD", 0.01, 0.9
    return "AdamW", round(0.002 * 5 / (4 + num_classes), 6), 0.9


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (weights with decay, normalization weights, biases), Ultralytics' three groups."""
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    decay, norm, bias = [], [], []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            fullname = f"{module_name}.{param_name}" if module_name else param_name
            if "bias" in fullname:
                bias.append(param)
            elif isinstance(module, norm_types) or "logit_scale" in fullname:
                norm.append(param)
            else:
                decay.append(param)
    return decay, norm, bias


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer over Ultralytics' groups: pg0 weights (decayed), pg1 norm weights, pg2 biases.

    Each group carries ``initial_lr`` (the lr the schedule scales) and ``param_group`` (``weight``/``bn``/``bias``).
    MuSGD has eight groups instead (:func:`build_musgd`).
    """
    if name == "MuSGD":
        return build_musgd(model, lr, momentum, weight_decay)
    decay, norm, bias = param_groups(model)
    if name in ("Adam", "AdamW"):
        args = {"lr": lr, "betas": (momentum, 0.999), "weight_decay": 0.0}
    elif name == "SGD":
        args = {"lr": lr, "momentum": momentum, "nesterov": True}
    else:
        raise ValueError(f"unsupported optimizer {name}")
    groups = [
        {"params": decay, **args, "weight_decay": weight_decay, "param_group": "weight", "initial_lr": lr},
        {"params": norm, **args, "weight_decay": 0.0, "param_group": "bn", "initial_lr": lr},
        {"params": bias, **args, "param_group": "bias", "initial_lr": lr},
    ]
    optimizer = getattr(torch.optim, name)(groups)
    log.info(
        "optimizer: %s(lr=%g, momentum=%g) with %d weight(decay=0.0), %d weight(decay=%g), %d bias(decay=0.0)",
        name, lr, momentum, len(norm), len(decay), weight_decay, len(bias),
    )
    return optimizer


def build_musgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """Ultralytics 8.4's MuSGD with its groups: every matrix and conv filter in a Muon+SGD group (decayed), the other
    parameters in the usual weight/bn/bias groups, and each of the four split in two: the class heads (``cv3``,
    ``one2one_cv3``) and YOLO26's semantic branch (``proto.semseg``) at 3x the lr, then the rest. Groups in
    Ultralytics' order: weight (3x, 1x), bn (3x, 1x), bias (3x, 1x), muon (3x, 1x).
    """
    from cellseg_pl.yolo.optim import musgd_class

    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    kinds: dict[str, list[tuple[str, nn.Parameter]]] = {"weight": [], "bn": [], "bias": [], "muon": []}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            fullname = f"{module_name}.{param_name}" if module_name else param_name
            if param.ndim in (2, 4):  # Muon orthogonalizes matrices and conv filters only
                kinds["muon"].append((fullname, param))
            elif "bias" in fullname:
                kinds["bias"].append((fullname, param))
            elif isinstance(module, norm_types) or "logit_scale" in fullname:
                kinds["bn"].append((fullname, param))
            else:
                kinds["weight"].append((fullname, param))
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    boosted = {id(p) for m in (getattr(head, "cv3", None), getattr(head, "one2one_cv3", None)) if m is not None
               for p in m.parameters()}
    args = {"lr": lr, "momentum": momentum, "nesterov": True}
    options = {"weight": {"weight_decay": weight_decay}, "bn": {"weight_decay": 0.0}, "bias": {"weight_decay": 0.0},
               "muon": {"weight_decay": weight_decay, "use_muon": True}}
    groups = []
    for kind, named in kinds.items():
        fast = [p for n, p in named if id(p) in boosted or "proto.semseg" in n]
        rest = [p for n, p in named if not (id(p) in boosted or "proto.semseg" in n)]
        for params, group_lr in ((fast, 3 * lr), (rest, lr)):
            groups.append({"params": params, **args, **options[kind], "param_group": kind, "lr": group_lr,
                           "initial_lr": group_lr})
    optimizer = musgd_class()(groups, muon=MUSGD_MUON, sgd=MUSGD_SGD)
    log.info("optimizer: MuSGD(lr=%g, momentum=%g) with %d muon (decay=%g), %d weight(decay=0.0), %d bias(decay=0.0)"
             "; class heads at 3x lr", lr, momentum, len(kinds["muon"]), weight_decay, len(kinds["bn"]),
             len(kinds["bias"]))
    return optimizer


def lr_factor(epoch: int, epochs: int, lrf: float, cos_lr: bool) -> float:
    """Per-epoch lr multiplier: linear (or cosine with ``cos_lr``) from 1 at epoch 0 to ``lrf`` at ``epochs``."""
    if cos_lr:
        return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return max(1 - epoch / epochs, 0) * (1.0 - lrf) + lrf


def warmup_iterations(warmup_epochs: float, epochs: int, batches_per_epoch: int) -> int:
    """Warmup length in iterations, leaving at least the final epoch for regular training (Ultralytics 8.4)."""
    w = min(warmup_epochs, max(epochs - 1, 0))
    return round(w * batches_per_epoch) if w > 0 else 0


def schedule(
    optimizer: torch.optim.Optimizer,
    ni: int,
    epoch: int,
    epochs: int,
    nw: int,
    accumulate: int,
    lrf: float,
    cos_lr: bool,
    momentum: float,
    warmup_momentum: float,
    warmup_bias_lr: float,
) -> int:
    """Set every group's lr (and momentum) for iteration ``ni`` of ``epoch``; return the accumulation to use.

    During the first ``nw`` iterations the bias lr falls from ``warmup_bias_lr`` and the other lrs rise from 0 to
    their scheduled value, SGD's momentum rises from ``warmup_momentum``, and accumulation ramps from 1 to
    ``accumulate``.
    """
    factor = lr_factor(epoch, epochs, lrf, cos_lr)
    acc = accumulate
    for group in optimizer.param_groups:
        target = group["initial_lr"] * factor
        if nw and ni <= nw:
            start = warmup_bias_lr if group.get("param_group") == "bias" else 0.0
            group["lr"] = float(np.interp(ni, [0, nw], [start, target]))
            # (Ultralytics warms up SGD's momentum only: Adam's beta1 stays at ``momentum`` throughout)
            if "momentum" in group:
                group["momentum"] = float(np.interp(ni, [0, nw], [warmup_momentum, momentum]))
        else:
            group["lr"] = target
            if "momentum" in group:
                group["momentum"] = momentum
    if nw and ni <= nw:
        acc = max(1, int(np.interp(ni, [0, nw], [1, accumulate]).round()))
    return acc


class EMA(nn.Module):
    """Exponential moving average of a model's weights and buffers (Ultralytics' ``ModelEMA``).

    ``decay(updates) = decay * (1 - exp(-updates / tau))`` ramps the average in during early training. As an
    ``nn.Module`` the averaged copy and the update count are part of the LightningModule's state dict, so
    checkpoints and resume carry them.

    Args:
        model: the model to average (copied).
        decay: maximum decay.
        tau: ramp time constant in optimizer steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0) -> None:
        super().__init__()
        self.module = deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau = decay, tau
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> "EMA":
        """The average is never trained: it stays in eval mode whatever the parent module's mode."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the current weights of ``model`` (call after each optimizer step)."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-int(self.updates) / self.tau))
        ema_v, model_v = self._pairs(model)
        if ema_v:  # ema = d * ema + (1 - d) * model, fused over all tensors
            torch._foreach_lerp_(ema_v, model_v, 1 - d)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Floating-point (EMA, model) tensor pairs; rebuilt only when a tensor moved (e.g. to another device)."""
        cached = getattr(self, "_cache", None)
        first = next(model.parameters())
        if cached is None or cached[2] != (first.data_ptr(), next(self.module.parameters()).data_ptr()):
            msd = model.state_dict()
            pairs = [(v, msd[k].detach()) for k, v in self.module.state_dict().items() if v.dtype.is_floating_point]
            ema_v, model_v = [e for e, _ in pairs], [m for _, m in pairs]
            self._cache = (ema_v, model_v, (first.data_ptr(), next(self.module.parameters()).data_ptr()))
            cached = self._cache
        return cached[0], cached[1]


class Recipe:
    """Ultralytics' optimization recipe as one object: the optimizer and its groups, the warmup, the lr decay, the
    accumulation to the nominal batch and the non-finite step guard.

    The LightningModule asks it, per iteration: the lr and momentum of every group (:meth:`schedule`), whether the
    optimizer steps now (:meth:`due`), and tells it when a step happened (:meth:`stepped`) or a loss or gradient was
    not finite (:meth:`nonfinite`). Its one piece of state, the iteration of the last step, is saved in the
    checkpoint (``cellseg_last_opt_step``), so a resumed run steps at the same iterations.

    Args:
        optimizer: ``SGD``, ``Adam``, ``AdamW``, ``MuSGD`` or ``auto`` (see :func:`resolve_optimizer`).
        lr0, lrf, momentum, weight_decay, warmup_epochs, warmup_momentum, warmup_bias_lr, cos_lr, nbs: Ultralytics'
            hyper-parameters of those names (documented as the module's ``--model.*`` flags).
        num_classes: the class count (``auto`` fits its lr to it).
        max_nonfinite: this many non-finite losses or gradients in a row stop the run.
    """

    def __init__(self, optimizer: str = "auto", lr0: float = 0.01, lrf: float = 0.01, momentum: float = 0.937,
                 weight_decay: float = 0.0005, warmup_epochs: float = 3.0, warmup_momentum: float = 0.8,
                 warmup_bias_lr: float = 0.1, cos_lr: bool = False, nbs: int = 64, num_classes: int = 1,
                 max_nonfinite: int = 5) -> None:
        resolve_optimizer(optimizer, lr0, momentum, num_classes, 0)  # fail at construction on a bad name
        self.optimizer, self.lr0, self.lrf, self.momentum = optimizer, lr0, lrf, momentum
        self.weight_decay, self.warmup_epochs, self.warmup_momentum = weight_decay, warmup_epochs, warmup_momentum
        self.warmup_bias_lr, self.cos_lr, self.nbs, self.num_classes = warmup_bias_lr, cos_lr, nbs, num_classes
        self.max_nonfinite = max_nonfinite
        self.accumulate = 1  # batches per optimizer step after warmup
        self.accumulate_now = 1  # this iteration's (ramped during warmup)
        self.warmup = 0  # warmup iterations
        self.last_opt_step = -1  # the iteration of the last optimizer step
        self.epochs = 1
        self._momentum, self._bias_lr, self._nonfinite = momentum, warmup_bias_lr, 0

    def build(self, net: nn.Module, batch_total: int, images: int, batches_per_epoch: int,
              epochs: int) -> torch.optim.Optimizer:
        """The optimizer for a run of ``epochs`` epochs of ``batches_per_epoch`` batches of ``batch_total`` images
        (all devices together) over ``images`` training images."""
        self.epochs = epochs
        self.accumulate = min(max(round(self.nbs / batch_total), 1), max(batches_per_epoch * epochs, 1))
        weight_decay = self.weight_decay * batch_total * self.accumulate / self.nbs
        iterations = math.ceil(images / max(batch_total, self.nbs)) * epochs
        name, lr, momentum = resolve_optimizer(self.optimizer, self.lr0, self.momentum, self.num_classes, iterations)
        if self.optimizer.lower() == "auto":
            log.info("optimizer=auto: ignoring lr0=%g, using %s(lr=%g, momentum=%g)", self.lr0, name, lr, momentum)
            self._bias_lr = 0.0
        else:
            self._bias_lr = self.warmup_bias_lr
        self._momentum = momentum
        self.warmup = warmup_iterations(self.warmup_epochs, epochs, batches_per_epoch)
        return build_optimizer(net, name, lr, momentum, weight_decay)

    def schedule(self, optimizer: torch.optim.Optimizer, ni: int, epoch: int) -> None:
        """Set every group's lr (and momentum) for iteration ``ni`` of ``epoch`` and this iteration's accumulation."""
        self.accumulate_now = schedule(optimizer, ni, epoch, self.epochs, self.warmup, self.accumulate, self.lrf,
                                       self.cos_lr, self._momentum, self.warmup_momentum, self._bias_lr)

    def epoch_start(self, batches_per_epoch: int, epoch: int) -> None:
        self.last_opt_step = min(self.last_opt_step, batches_per_epoch * epoch - 1)

    def due(self, ni: int) -> bool:
        """Whether the optimizer steps after iteration ``ni``'s backward pass."""
        return ni - self.last_opt_step >= self.accumulate_now

    def stepped(self, ni: int) -> None:
        """The optimizer stepped (or a non-finite step was dropped) at iteration ``ni``."""
        self.last_opt_step = ni

    def finite(self) -> None:
        """A finite iteration: the count of non-finite ones in a row starts again."""
        self._nonfinite = 0

    def nonfinite(self, what: str, epoch: int, batch_idx: int) -> None:
        """Skip one step with a warning; stop with a clear error after ``max_nonfinite`` in a row."""
        self._nonfinite += 1
        log.warning("epoch %d, batch %d: non-finite %s, step skipped (%d in a row)", epoch, batch_idx, what,
                    self._nonfinite)
        if self._nonfinite >= self.max_nonfinite:
            raise FloatingPointError(
                f"training stopped at epoch {epoch}, batch {batch_idx}: {self._nonfinite} non-finite "
                f"losses/gradients in a row; lower --model.lr0, check the data, or train with --trainer.precision 32"
            )

    @staticmethod
    def finite_gradients(net: nn.Module) -> bool:
        """Whether every gradient of ``net`` is finite (one fused norm over all of them; beyond ~1e19 counts as not)."""
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True

    def save(self, checkpoint: dict[str, Any], net: nn.Module) -> None:
        """Into a checkpoint: the iteration of the last step, and the gradients accumulated since (the next step
        needs them), so a resumed run steps at the same iterations with the same sums."""
        checkpoint["cellseg_last_opt_step"] = self.last_opt_step
        pending = {n: p.grad.detach().cpu() for n, p in net.named_parameters() if p.grad is not None}
        if pending:
            checkpoint["cellseg_pending_grads"] = pending

    def load(self, checkpoint: dict[str, Any]) -> None:
        """From a checkpoint :meth:`save` wrote; the gradients wait for :meth:`restore_gradients`."""
        self.last_opt_step = checkpoint.get("cellseg_last_opt_step", -1)
        self._pending = checkpoint.get("cellseg_pending_grads")

    def restore_gradients(self, net: nn.Module) -> None:
        """Once the network is on its device: put back the gradients a loaded checkpoint was saved with."""
        pending, self._pending = getattr(self, "_pending", None), None
        for name, p in net.named_parameters() if pending else ():
            if name in pending:
                p.grad = pending[name].to(device=p.device, dtype=p.dtype)

    def step(self, module: Any, optimizer: Any, ni: int, epoch: int, batch_idx: int) -> bool:
        """After iteration ``ni``'s backward pass: when a step is due, clip the gradients, step (or skip a step whose
        gradients are not finite), clear them and update the module's weight average.

        Args:
            module: the LightningModule (its ``net``, ``ema``, ``hparams.grad_clip``; Lightning's clipping and
                precision plugin).
            optimizer: Lightning's wrapped optimizer.

        Returns:
            False when a step was skipped for non-finite gradients, else True.
        """
        if not self.due(ni):
            return True
        if module.hparams.grad_clip > 0:
            module.clip_gradients(optimizer, gradient_clip_val=module.hparams.grad_clip,
                                  gradient_clip_algorithm="norm")
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        if scaler is None and not self.finite_gradients(module.net):
            # (with a 16-bit grad scaler, the scaler itself skips such steps and lowers its scale)
            self.nonfinite("gradient", epoch, batch_idx)
            optimizer.zero_grad(set_to_none=True)
            self.stepped(ni)
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.stepped(ni)
        if module.ema is not None:
            module.ema.update(module.net)
        return True
