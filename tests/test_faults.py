"""Reliability: kill -9 and resume, NaN losses, config errors that get one clear line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cellseg_pl.__main__ import main

from conftest import fit_args

REPO = Path(__file__).resolve().parents[1]

KILLER = textwrap.dedent(
    """
    import os, signal
    import lightning as L

    class KillAtEpoch(L.Callback):
        '''SIGKILL this process when the given epoch starts (the previous epoch's last.ckpt is on disk).'''

        def __init__(self, epoch: int = 2):
            self.epoch = epoch

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == self.epoch:
                os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "cellseg_pl", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def last_row(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))[-1]


@pytest.mark.slow
@pytest.mark.parametrize("model, optimizer", [("yolov8n-seg.yaml", "auto"), ("yolo26n-seg.yaml", "MuSGD")])
def test_kill_9_then_resume_ends_like_an_uninterrupted_run(tiny_data, tmp_path, model, optimizer):
    """Also YOLO26-seg, whose loss weighs its two branches by epoch (Ultralytics #24046: a resumed YOLO26-seg run
    shows zero losses and metrics), with MuSGD and its two momentum buffers per matrix."""
    (tmp_path / "killer.py").write_text(KILLER)
    # nbs 12: a step every 3 batches of 2 per epoch, so the kill falls inside an accumulation (resumed from the
    # gradients the checkpoint holds)
    common = ["--trainer.deterministic", "true", "--seed_everything", "7", "--data.mosaic", "1.0",
              "--data.close_mosaic", "1", "--model.nbs", "12", "--model.model", model, "--model.optimizer", optimizer]
    full = run_cli(fit_args(tiny_data, tmp_path, "full", 3, *common), tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]

    killed = run_cli(fit_args(tiny_data, tmp_path, "killed", 3, *common,
                              "--trainer.callbacks+=killer.KillAtEpoch"), tmp_path)
    assert killed.returncode == -9  # really killed, no graceful shutdown
    ckpt = torch.load(tmp_path / "killed" / "weights" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # the last complete epoch survived the kill, loadable
    assert ckpt["cellseg_pending_grads"]  # the batches accumulated since the last optimizer step
    if optimizer == "MuSGD":  # its Muon and SGD momentum buffers are in the checkpoint
        states = ckpt["optimizer_states"][0]["state"].values()
        assert any("momentum_buffer_SGD" in state for state in states)
    assert not list((tmp_path / "killed" / "weights").glob(".*.partial-*"))

    resumed = run_cli(fit_args(tiny_data, tmp_path, "killed", 3, *common, "--ckpt_path", "last"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = last_row(tmp_path / "full" / "results.csv"), last_row(tmp_path / "killed" / "results.csv")
    assert a["epoch"] == b["epoch"] == "3"
    losses = [k for k in b if k.startswith("train/") and k.endswith("_loss")]
    assert len(losses) == (5 if model.startswith("yolo26") else 4) and all(float(b[k]) > 0 for k in losses), b
    for key in a:
        if key != "time":
            assert a[key] == b[key], key
    wa = torch.load(tmp_path / "full" / "weights" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "killed" / "weights" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_nan_loss_skips_the_step_then_stops_with_a_clear_error(tiny_data, tmp_path, monkeypatch, capsys, caplog):
    from cellseg_pl.train.module import CellSegModule

    real = CellSegModule.criterion
    calls = {"n": 0}

    def sometimes_nan(self, preds, batch):
        loss, parts = real(self, preds, batch)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:  # one bad batch: skipped, training goes on
                return loss * float("nan"), parts
        return loss, parts

    monkeypatch.setattr(CellSegModule, "criterion", sometimes_nan)
    assert main(fit_args(tiny_data, tmp_path, "one_nan", 2)) == 0
    assert "non-finite loss nan, step skipped" in caplog.text
    ckpt = torch.load(tmp_path / "one_nan" / "weights" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())

    def always_nan(self, preds, batch):
        loss, parts = real(self, preds, batch)
        return (loss * float("nan"), parts) if self.training else (loss, parts)

    monkeypatch.setattr(CellSegModule, "criterion", always_nan)
    code = main(fit_args(tiny_data, tmp_path, "all_nan", 3, "--model.max_nonfinite", "2"))
    err = capsys.readouterr().err
    assert code == 1
    assert "error: training stopped at epoch 0, batch 1: 2 non-finite losses/gradients in a row" in err
    assert not (tmp_path / "all_nan" / "weights" / "best.ckpt").exists()  # a NaN model is never saved as best


def test_unknown_config_key_is_named(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(fit_args(tiny_data, tmp_path, "k", 1, "--model.lr_zero", "0.1"))
    assert e.value.code == 2
    assert "lr_zero" in capsys.readouterr().err


def test_weights_file_that_is_not_a_model(tiny_data, tmp_path, capsys):
    bogus = tmp_path / "yolov8s_cells_v1.0.pt"
    bogus.write_bytes(b"this is not a pickle")
    code = main(fit_args(tiny_data, tmp_path, "w", 1, "--model.model", str(bogus)))
    err = capsys.readouterr().err.strip()
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("error: --model.model:") and "is not a readable PyTorch model file" in last
    assert "Traceback" not in err


def test_bad_model_name_is_named(tiny_data, tmp_path, capsys):
    code = main(fit_args(tiny_data, tmp_path, "w", 1, "--model.model", "yolov8q-seg"))
    assert code == 2
    assert "yolov8q-seg is neither a model yaml" in capsys.readouterr().err
