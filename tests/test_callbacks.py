"""Callbacks of every fit: the guide's weights/best.pt and last.pt, the console lines and the closing summary."""

from __future__ import annotations

import re

import pytest

from cellseg_pl.__main__ import main

from conftest import fit_args


@pytest.mark.slow
def test_fit_writes_ultralytics_weights_and_a_readable_console(tiny_data, tmp_path, capsys):
    assert main(fit_args(tiny_data, tmp_path, "run", 2)) == 0
    err = capsys.readouterr().err
    run = tmp_path / "run"
    weights = run / "weights"
    assert (weights / "best.pt").is_file() and (weights / "last.pt").is_file()
    assert not list(weights.glob(".partial-*"))
    # one line per validated epoch, 1-based, with the losses and the mask metrics
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all(re.search(r"box [\d.]+ seg [\d.]+ cls [\d.]+ dfl [\d.]+ .*mAP50-95 [\d.]+ F1 [\d.]+", x) for x in lines)
    # the closing lines: best epoch, the run folder and what is in it
    assert re.search(r"best epoch [12] \(fitness [\d.]+\): mask P", err)
    summary = next(line for line in err.splitlines() if line.startswith("results saved to"))
    assert str(run) in summary and "weights/best.pt" in summary and "results.csv" in summary
    # no cellseg_pl log line is printed twice
    ours = [line for line in err.splitlines() if line.startswith(("epoch ", "best epoch", "results saved"))]
    assert len(ours) == len(set(ours))

    # the guide's step 5, `yolo segment val model=.../weights/best.pt`, on the run's own best.pt
    from ultralytics import YOLO

    model = YOLO(str(weights / "best.pt"))
    assert model.task == "segment" and model.names == {0: "cell"}
    assert model.overrides.get("data") == str(tiny_data.resolve())  # data= comes from the file's train_args
    metrics = model.val(data=str(tiny_data), imgsz=128, batch=4, device="cpu", plots=False, verbose=False,
                        project=str(tmp_path / "val"), name="v")
    assert 0.0 <= metrics.seg.map50 <= 1.0


def test_progress_bar_counts_epochs_from_one_and_log_lines_stay_off_it(tiny_data, tmp_path, capsys):
    args = [a if a != "false" or prev != "--trainer.enable_progress_bar" else "true"
            for prev, a in zip([None, *fit_args(tiny_data, tmp_path, "bar", 1)], fit_args(tiny_data, tmp_path, "bar", 1))]
    assert main(args) == 0
    captured = capsys.readouterr()
    err = captured.err
    bars = captured.out + captured.err  # (Lightning draws its bars on stdout)
    assert "Epoch 1/1" in bars and "Epoch 0" not in bars
    # our log lines start on a line of their own (written through tqdm), never glued to a bar
    assert re.search(r"^epoch 1/1 ", err, re.MULTILINE)
