"""The CLI end to end on tiny data: help, fit, results.csv, checkpoints, resume, run folders, clear errors."""

from __future__ import annotations

import csv
import inspect
import re

import pytest
import torch

from cellseg_pl.__main__ import main
from cellseg_pl.datamodule import CellSegDataModule
from cellseg_pl.module import CellSegModule

from conftest import fit_args


def init_args(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def test_fit_help_documents_every_model_and_data_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    linked = {"num_classes", "class_names", "overlap_mask"}  # linked from the data: said once, in data
    for name in init_args(CellSegModule):
        if name not in linked:
            assert f"--model.{name}" in help_text, name
    for name in init_args(CellSegDataModule):
        assert f"--data.{name}" in help_text, name
    # the docstrings become the help text
    assert "nominal batch size" in help_text and "turn mosaic off for the last N epochs" in help_text


def read_results(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fit_then_resume_continues_at_next_epoch(tiny_data, tmp_path):
    assert main(fit_args(tiny_data, tmp_path, "run", 2)) == 0
    run = tmp_path / "run"
    assert (run / "weights" / "last.ckpt").is_file() and (run / "weights" / "best.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    rows = read_results(run / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in ("train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss", "metrics/mAP50(M)",
                   "metrics/mAP50-95(M)", "metrics/precision(M)", "metrics/recall(M)", "val/seg_loss", "lr/pg0"):
        assert rows[0][column] != "", column
    first = torch.load(run / "weights" / "last.ckpt", weights_only=False)
    assert first["epoch"] == 1

    assert main(fit_args(tiny_data, tmp_path, "run", 3, "--ckpt_path", "last")) == 0
    rows_after = read_results(run / "results.csv")
    assert [r["epoch"] for r in rows_after] == ["1", "2", "3"]
    assert rows_after[:2] == rows[:2]  # earlier epochs untouched, the resumed run added epoch 3 only
    assert float(rows_after[2]["time"]) > float(rows[1]["time"])  # training time keeps counting
    resumed = torch.load(run / "weights" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2
    assert resumed["global_step"] > first["global_step"]
    ema_before = first["state_dict"]["ema.updates"]
    assert resumed["state_dict"]["ema.updates"] > ema_before
    assert not (tmp_path / "run2").exists()  # resume writes into the same run folder


@pytest.mark.slow
def test_new_fit_never_overwrites_an_earlier_run(tiny_data, tmp_path):
    assert main(fit_args(tiny_data, tmp_path, "exp", 1)) == 0
    assert main(fit_args(tiny_data, tmp_path, "exp", 1)) == 0
    assert (tmp_path / "exp" / "results.csv").is_file() and (tmp_path / "exp2" / "results.csv").is_file()


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    code = main(fit_args(tmp_path / "nope" / "dataset.yaml", tmp_path, "x", 1))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and "nope/dataset.yaml does not exist" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "x").exists()


def test_resume_without_checkpoint_is_clear(tiny_data, tmp_path, capsys):
    code = main(fit_args(tiny_data, tmp_path, "fresh", 1, "--ckpt_path", "last"))
    assert code == 2
    assert "last.ckpt does not exist" in capsys.readouterr().err


def test_missing_weights_file_is_clear(tiny_data, tmp_path, capsys):
    code = main(fit_args(tiny_data, tmp_path, "w", 1, "--model.model", str(tmp_path / "yolov8s_cells_v1.0.pt")))
    assert code == 2
    assert "yolov8s_cells_v1.0.pt does not exist" in capsys.readouterr().err


def test_print_config(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(tiny_data, tmp_path, "p", 1, "--print_config"))
    out = capsys.readouterr().out
    assert "imgsz: 128" in out and "patience: 20" in out and "model: yolov8n-seg.yaml" in out


@pytest.mark.slow
def test_fine_tune_from_a_cellseg_checkpoint(tiny_data, tmp_path):
    from cellseg_pl.model import build_network, load_weights

    assert main(fit_args(tiny_data, tmp_path, "first", 1)) == 0
    ckpt = tmp_path / "first" / "weights" / "last.ckpt"
    source, names, _ = load_weights(ckpt)
    net = build_network(str(ckpt), 1, {0: "cell"})
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items())  # starts from the EMA weights
    assert main(fit_args(tiny_data, tmp_path, "second", 1, "--model.model", str(ckpt))) == 0
    assert (tmp_path / "second" / "weights" / "last.ckpt").is_file()
