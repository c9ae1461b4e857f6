"""cellseg_pl.train.recipe against Ultralytics 8.4.190's trainer: parameter groups, ``optimizer=auto``, lr decay, warmup,
accumulation and the weight EMA.

Where Ultralytics has a function (``BaseTrainer.build_optimizer``, ``_get_warmup_iterations``, ``_setup_scheduler``,
``ModelEMA``) the test calls it on a stand-in ``self``; the warmup block, written inline in ``BaseTrainer._do_train``,
is transcribed in :func:`ultralytics_warmup` below. A few numbers are also written out by hand.
"""

from __future__ import annotations

import math
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.utils.torch_utils import ModelEMA

from cellseg_pl.train.recipe import (
    EMA,
    OPTIMIZERS,
    build_optimizer,
    lr_factor,
    param_groups,
    resolve_optimizer,
    schedule,
    warmup_iterations,
)


class TinyNet(nn.Module):
    """Conv (no bias) + BatchNorm + conv with bias + linear, and a ``logit_scale`` (no decay in Ultralytics)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(2, 3)
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.bn(self.conv(x))).mean((2, 3))) * self.logit_scale


def trainer_self(**args) -> SimpleNamespace:
    """What ``BaseTrainer`` methods read from ``self``: ``args`` (Ultralytics' cfg names), ``data``, ``epochs``."""
    defaults = {"lr0": 0.01, "lrf": 0.01, "cos_lr": False, "warmup_epochs": 3.0, "warmup_bias_lr": 0.1,
                "warmup_momentum": 0.8, "momentum": 0.937}  # fmt: skip
    defaults.update(args)
    return SimpleNamespace(args=SimpleNamespace(**defaults), data={"nc": defaults.pop("nc", 1)}, epochs=None)


def ultralytics_warmup(optimizer, ni: int, epoch: int, nw: int, acc0: int, lf, args) -> int:
    """``BaseTrainer._do_train``'s warmup block (ultralytics/engine/trainer.py, 8.4.190), returns ``accumulate``."""
    accumulate = acc0
    if nw and ni <= nw:
        xi = [0, nw]
        accumulate = max(1, int(np.interp(ni, xi, [1, acc0]).round()))
        for x in optimizer.param_groups:
            x["lr"] = float(np.interp(ni, xi, [args.warmup_bias_lr if x.get("param_group") == "bias" else 0.0,
                                               x["initial_lr"] * lf(epoch)]))  # fmt: skip
            if "momentum" in x:
                x["momentum"] = float(np.interp(ni, xi, [args.warmup_momentum, args.momentum]))
    return accumulate


def ultralytics_lf(epochs: int, **args):
    """Ultralytics' per-epoch lr lambda, from ``BaseTrainer._setup_scheduler``."""
    fake = trainer_self(**args)
    fake.epochs = epochs
    fake.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    BaseTrainer._setup_scheduler(fake)
    return fake.lf


# ---------------------------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_parameter_groups_and_hyperparameters_match_ultralytics(name):
    model = TinyNet()
    ours = build_optimizer(model, name, lr=0.005, momentum=0.9, weight_decay=0.00025)
    theirs = BaseTrainer.build_optimizer(trainer_self(), model, name, lr=0.005, momentum=0.9, decay=0.00025)
    assert type(ours) is type(theirs)
    assert len(ours.param_groups) == len(theirs.param_groups) == 3
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        for key in ("lr", "weight_decay", "param_group", "momentum", "betas", "nesterov"):
            assert a.get(key) == b.get(key), (name, a["param_group"], key)
        assert a["initial_lr"] == 0.005  # what the schedule scales (Ultralytics' LambdaLR adds the same key)
    # the three groups by hand: decayed weights, norm weights (+ logit_scale), every bias
    decay, norm, bias = param_groups(model)
    assert [id(p) for p in decay] == [id(model.conv.weight), id(model.conv2.weight), id(model.head.weight)]
    assert [id(p) for p in norm] == [id(model.logit_scale), id(model.bn.weight)]
    assert [id(p) for p in bias] == [id(model.bn.bias), id(model.conv2.bias), id(model.head.bias)]
    assert [g["weight_decay"] for g in ours.param_groups] == [0.00025, 0.0, 0.0]


@pytest.mark.parametrize("nc", [1, 3, 80])
def test_auto_short_run_matches_ultralytics(nc):
    fake = trainer_self(nc=nc, lr0=0.123)
    theirs = BaseTrainer.build_optimizer(fake, TinyNet(), "auto", lr=0.123, momentum=0.937, iterations=200)
    name, lr, momentum = resolve_optimizer("auto", 0.123, 0.937, nc, 200)
    assert (name, lr, momentum) == (type(theirs).__name__, theirs.param_groups[0]["lr"], theirs.param_groups[0]["betas"][0])
    assert lr == round(0.002 * 5 / (4 + nc), 6)  # 0.002 for one class
    assert fake.args.warmup_bias_lr == 0.0  # Ultralytics starts the bias warmup at 0 with auto (module.py does too)


def test_auto_long_run_and_explicit_names():
    from cellseg_pl.yolo.network import build_network

    fake = trainer_self(nc=1, lr0=0.123)  # (Ultralytics' MuSGD groups read the head: a real network)
    theirs = BaseTrainer.build_optimizer(fake, build_network("yolov8n-seg.yaml", 1), "auto", lr=0.123,
                                         momentum=0.937, iterations=10001)
    assert resolve_optimizer("auto", 0.123, 0.937, 1, 10001) == (type(theirs).__name__, 0.01, 0.9) == ("MuSGD", 0.01, 0.9)
    assert resolve_optimizer("auto", 0.123, 0.937, 1, 10000)[0] == "AdamW"  # (">", as Ultralytics)
    assert resolve_optimizer("adamw", 0.003, 0.95, 1, 10**6) == ("AdamW", 0.003, 0.95)  # case-insensitive, kept
    assert resolve_optimizer("musgd", 0.003, 0.95, 1, 10) == ("MuSGD", 0.003, 0.95)
    assert set(OPTIMIZERS) == {"SGD", "Adam", "AdamW", "MuSGD", "auto"}
    with pytest.raises(ValueError, match=r"^--model\.optimizer: 'RMSprop' is not one of SGD, Adam, AdamW, MuSGD, auto$"):
        resolve_optimizer("RMSprop", 0.01, 0.9, 1, 100)


@pytest.mark.parametrize("yaml", ["yolov8n-seg.yaml", "yolo26n-seg.yaml"])
def test_musgd_groups_and_steps_match_ultralytics(yaml):
    """MuSGD as Ultralytics 8.4 builds it (8 groups, class heads and YOLO26's semantic branch at 3x lr), and the
    same weights after warmed-up steps on the same gradients."""
    from cellseg_pl.yolo.network import build_network

    torch.manual_seed(0)
    net = build_network(yaml, 1)
    twin = deepcopy(net)
    ours = build_optimizer(net, "MuSGD", lr=0.01, momentum=0.9, weight_decay=0.0005)
    theirs = BaseTrainer.build_optimizer(trainer_self(), twin, "MuSGD", lr=0.01, momentum=0.9, decay=0.0005)
    assert type(ours) is type(theirs) and (ours.muon, ours.sgd) == (theirs.muon, theirs.sgd) == (0.2, 1.0)
    assert len(ours.param_groups) == len(theirs.param_groups) == 8
    names = {id(p): n for n, p in net.named_parameters()} | {id(p): n for n, p in twin.named_parameters()}
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert [names[id(p)] for p in a["params"]] == [names[id(p)] for p in b["params"]]
        for key in ("lr", "weight_decay", "param_group", "momentum", "nesterov", "use_muon"):
            assert a.get(key) == b.get(key), (a["param_group"], key)
        assert a["initial_lr"] == a["lr"]
    boosted = [g for g in ours.param_groups if g["lr"] == 0.03]
    assert sum(len(g["params"]) for g in boosted) > 0
    if "26" in yaml:
        assert any("proto.semseg" in names[id(p)] for g in boosted for p in g["params"])
    for step in range(3):
        for a, b in zip(net.parameters(), twin.parameters()):
            a.grad = b.grad = torch.randn_like(a) * 0.01
        ours.step()
        theirs.step()
    for (n, a), b in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("warmup_epochs, epochs, nb", [(3.0, 10, 7), (3.0, 2, 7), (0.5, 10, 7), (3.0, 1, 7),
                                                        (0.0, 10, 7), (2.7, 40, 13), (3.0, 100, 1)])  # fmt: skip
def test_warmup_iterations_match_ultralytics(warmup_epochs, epochs, nb):
    fake = trainer_self(warmup_epochs=warmup_epochs)
    fake.epochs = epochs
    assert warmup_iterations(warmup_epochs, epochs, nb) == BaseTrainer._get_warmup_iterations(fake, nb)


def test_warmup_iterations_by_hand():
    assert warmup_iterations(3.0, 40, 8) == 24
    assert warmup_iterations(3.0, 2, 8) == 8  # leaves the final epoch unwarmed (8.4.190: no 100-iteration minimum)
    assert warmup_iterations(3.0, 1, 8) == 0


@pytest.mark.parametrize("cos_lr", [False, True])
def test_lr_factor_matches_ultralytics_scheduler(cos_lr):
    epochs, lrf = 12, 0.05
    lf = ultralytics_lf(epochs, lrf=lrf, cos_lr=cos_lr)
    for epoch in range(epochs + 2):
        assert lr_factor(epoch, epochs, lrf, cos_lr) == pytest.approx(lf(epoch), abs=1e-15)
    assert lr_factor(0, epochs, lrf, cos_lr) == 1.0
    assert lr_factor(epochs, epochs, lrf, cos_lr) == pytest.approx(lrf)
    assert lr_factor(6, epochs, lrf, cos_lr) == pytest.approx(0.525)  # half-way, linear and cosine alike


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_warmup_lr_momentum_and_accumulation_follow_ultralytics_loop(name):
    epochs, nb, acc0, lrf = 5, 7, 8, 0.01
    args = trainer_self(lrf=lrf, momentum=0.937, warmup_momentum=0.8, warmup_bias_lr=0.1).args
    nw = warmup_iterations(args.warmup_epochs, epochs, nb)
    assert nw == 21
    lf = ultralytics_lf(epochs, lrf=lrf)
    ours = build_optimizer(TinyNet(), name, lr=0.01, momentum=0.937, weight_decay=0.0005)
    theirs = build_optimizer(TinyNet(), name, lr=0.01, momentum=0.937, weight_decay=0.0005)
    for epoch in range(epochs):
        for g in theirs.param_groups:  # LambdaLR.step() at the start of each epoch
            g["lr"] = g["initial_lr"] * lf(epoch)
        for i in range(nb):
            ni = i + nb * epoch
            acc = schedule(ours, ni, epoch, epochs, nw, acc0, lrf, False, 0.937, 0.8, 0.1)
            assert acc == ultralytics_warmup(theirs, ni, epoch, nw, acc0, lf, args), ni
            for a, b in zip(ours.param_groups, theirs.param_groups):
                assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=1e-15), (ni, a["param_group"])
                assert a.get("momentum") == pytest.approx(b.get("momentum")), ni
                assert ("momentum" in a) == (name == "SGD")  # Adam's beta1 is never warmed up
            if ni >= nw:  # warmup ends exactly on the scheduled values
                assert [g["lr"] for g in ours.param_groups] == pytest.approx([0.01 * lf(epoch)] * 3)
                assert acc == acc0


def test_warmup_numbers_by_hand():
    opt = build_optimizer(TinyNet(), "SGD", lr=0.01, momentum=0.9, weight_decay=0.0)
    accs, lrs = [], []
    for ni in range(6):
        accs.append(schedule(opt, ni, 0, 10, 4, 4, 0.01, False, 0.9, 0.8, 0.1))
        lrs.append([round(g["lr"], 6) for g in opt.param_groups] + [round(opt.param_groups[0]["momentum"], 6)])
    # accumulate = round(interp(ni, [0, 4], [1, 4])): 1, 1.75, 2.5 (half to even: 2), 3.25, 4, then 4
    assert accs == [1, 2, 2, 3, 4, 4]
    assert lrs[0] == [0.0, 0.0, 0.1, 0.8]  # weights from 0, biases from warmup_bias_lr, momentum from 0.8
    assert lrs[2] == [0.005, 0.005, 0.055, 0.85]
    assert lrs[4] == lrs[5] == [0.01, 0.01, 0.01, 0.9]


def test_optimizer_steps_under_accumulation_match_ultralytics():
    """The step rule ``ni - last_opt_step >= accumulate`` over a warmed-up accumulation, as both loops run it."""
    epochs, nb, acc0 = 3, 5, 4
    nw = warmup_iterations(1.0, epochs, nb)
    args = trainer_self().args
    lf = ultralytics_lf(epochs)
    ours = build_optimizer(TinyNet(), "SGD", 0.01, 0.937, 0.0)
    theirs = build_optimizer(TinyNet(), "SGD", 0.01, 0.937, 0.0)
    steps_ours, steps_theirs, last_ours, last_theirs = [], [], -1, -1
    for ni in range(epochs * nb):
        epoch = ni // nb
        acc = schedule(ours, ni, epoch, epochs, nw, acc0, 0.01, False, 0.937, 0.8, 0.1)
        if ni - last_ours >= acc:
            steps_ours.append(ni)
            last_ours = ni
        if ni - last_theirs >= ultralytics_warmup(theirs, ni, epoch, nw, acc0, lf, args):
            steps_theirs.append(ni)
            last_theirs = ni
    assert steps_ours == steps_theirs == [0, 2, 6, 10, 14]  # after 1, 2, then 4 batches


# ---------------------------------------------------------------------------------------------- EMA


def perturb(model: nn.Module, generator: torch.Generator) -> None:
    """An optimizer step's worth of change to every float tensor, in place (as optimizers and BatchNorm do)."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.dtype.is_floating_point:
                v.add_(torch.randn(v.shape, generator=generator) * 0.1)
            else:
                v.add_(1)  # num_batches_tracked


def test_ema_matches_ultralytics_model_ema():
    torch.manual_seed(0)
    model, gen = TinyNet(), torch.Generator().manual_seed(1)
    ours, theirs = EMA(model, decay=0.99, tau=3.0), ModelEMA(model, decay=0.99, tau=3)
    for _ in range(6):
        perturb(model, gen)
        ours.update(model)
        theirs.update(model)
        for (k, a), (k2, b) in zip(ours.module.state_dict().items(), theirs.ema.state_dict().items()):
            assert k == k2
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(ours.updates) == theirs.updates == 6
    assert int(ours.module.bn.num_batches_tracked) == 0  # integer buffers are not averaged (as Ultralytics)


def test_ema_first_steps_by_hand():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, tau=2.0)
    expected = 1.0
    for updates, value in enumerate([3.0, 5.0, -1.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        d = 0.9 * (1 - math.exp(-updates / 2.0))  # 0.354, 0.569, 0.699
        expected = d * expected + (1 - d) * value
        assert float(ema.module.weight) == pytest.approx(expected, rel=1e-6)
    assert float(ema.module.weight) == pytest.approx(2.1178, abs=1e-4)


def test_ema_resumes_from_its_state_dict_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model, gen = TinyNet(), torch.Generator().manual_seed(2)
    ema = EMA(model, decay=0.99, tau=3.0)
    for _ in range(3):
        perturb(model, gen)
        ema.update(model)
    state = deepcopy(ema.state_dict())
    assert int(state["updates"]) == 3 and "module.bn.running_mean" in state
    resumed = EMA(TinyNet(), decay=0.99, tau=3.0)
    resumed.load_state_dict(state)
    perturb(model, gen)
    ema.update(model)
    resumed.update(model)
    for a, b in zip(ema.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the average is never trained, whatever its parent's mode
    parent = nn.Module()
    parent.ema = resumed
    parent.train()
    assert not resumed.training and not resumed.module.training and not resumed.module.bn.training
    assert not any(p.requires_grad for p in resumed.parameters())


def test_ema_follows_the_model_after_its_tensors_move():
    """Lightning moves the model to its device after the EMA saw it: new storage, and the EMA must follow it."""
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.5, tau=1e-9)  # d = 0.5 from the first update
    ema.update(model)
    for p in model.parameters():  # what .to(device) does: every parameter gets new storage
        p.data = torch.full_like(p.data, 4.0)
    before = ema.module.weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.5 * before + 0.5 * 4.0)
