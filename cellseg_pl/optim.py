"""Optimization as Ultralytics' trainer does it: parameter groups, warmup, lr decay, accumulation, weight EMA.

Everything here is a pure function of (epoch, iteration) or a small state that lives in the LightningModule's
checkpoint, so resuming from a Lightning checkpoint restores the schedule exactly.
"""

from __future__ import annotations

import logging
import math
from copy import deepcopy

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

#: Optimizers cellseg_pl builds (Ultralytics also has Adamax, NAdam, RAdam, RMSProp, MuSGD).
OPTIMIZERS = ("SGD", "Adam", "AdamW", "auto")


def resolve_optimizer(name: str, lr0: float, momentum: float, num_classes: int, iterations: float) -> tuple[str, float, float]:
    """Ultralytics' ``optimizer=auto`` rule: AdamW with a class-count-fitted lr for short runs, SGD for long ones.

    Args:
        name: ``SGD``, ``Adam``, ``AdamW`` or ``auto`` (case-insensitive).
        lr0: the configured initial lr (ignored by ``auto``, as in Ultralytics).
        momentum: the configured momentum (``auto`` uses 0.9).
        num_classes: number of classes.
        iterations: ``ceil(n_train_images / max(batch, nbs)) * epochs``.

    Returns:
        ``(name, lr0, momentum)`` actually used.
    """
    canonical = {o.lower(): o for o in OPTIMIZERS}.get(str(name).lower())
    if canonical is None:
        raise ValueError(f"--model.optimizer: '{name}' is not one of {', '.join(OPTIMIZERS)}")
    if canonical != "auto":
        return canonical, lr0, momentum
    if iterations > 10000:
        # Ultralytics 8.4 picks its own MuSGD here; plain SGD with the same lr is the closest standard optimizer.
        return "SGD", 0.01, 0.9
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
    """
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
