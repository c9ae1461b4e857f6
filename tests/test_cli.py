"""The CLI end to end on tiny data: help, fit, results.csv, checkpoints, resume, run folders, clear errors."""

from __future__ import annotations

import csv
import os
import inspect
import re
from pathlib import Path

import pytest
import torch

from cellseg_pl.__main__ import main
from cellseg_pl.data.datamodule import CellSegDataModule
from cellseg_pl.train.module import CellSegModule

from conftest import fit_args


def init_args(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def test_fit_help_documents_every_model_and_data_argument(capsys):
    assert main(["fit", "--help"]) == 0
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    linked = {"num_classes", "class_names", "overlap_mask"}  # linked from the data: said once, in data
    for name in init_args(CellSegModule):
        if name not in linked:
            assert f"--model.{name}" in help_text, name
    for name in init_args(CellSegDataModule):
        assert f"--data.{name}" in help_text, name
    # the docstrings become the help text
    assert "nominal batch size" in help_text and "turn mosaic, copy-paste and mixup off for the last N epochs" in help_text


@pytest.mark.parametrize("tool, flags", [
    ("convert", ["--coco_zip", "--output_dir", "--images_dir", "--val_fraction", "--overwrite", "--allow_empty"]),
    ("export", ["--ckpt", "--output", "--half"]),
    ("select", ["--model", "--pool", "--k", "--copy_to", "--exclude", "--no_tta", "--conf", "--tile"]),
    ("predict", ["--model", "--images", "--output", "--save_overlays", "--conf", "--min_area", "--tile"]),
    ("evaluate", ["--model", "--data", "--split", "--conf", "--sweep", "--output"]),
])  # fmt: skip
def test_tool_help_is_generated_from_the_signature_and_names_the_command(tool, flags, capsys):
    import cellseg_pl.commands as entry

    assert main([tool, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m cellseg_pl {tool} ") and "(--output-dir = --output_dir)" in text
    for flag in flags:
        assert flag in text, flag
    assert entry.TOOLS[tool].help.split()[0] in text  # the overview line is the description
    assert entry.run_tool(tool, ["-h"], prog="old_script.py") == 0
    assert capsys.readouterr().out.startswith("usage: old_script.py ")
    assert main([tool, "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: unrecognized arguments: --no-such-flag (see python -m cellseg_pl {tool} --help)\n"


def test_help_is_printed_from_the_cache_after_its_first_run(tmp_path, monkeypatch, capsys):
    import cellseg_pl.commands as entry
    import cellseg_pl.help_cache as help_cache
    import cellseg_pl.train.cli as train_cli

    monkeypatch.delenv("CELLSEG_PL_NO_HELP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for argv in (["fit", "--help"], ["predict", "-h"], ["cycle", "learn", "--help"]):
        assert main(argv) == 0
        first = capsys.readouterr().out
        assert first.startswith("usage: ") and "--help" in first
        with monkeypatch.context() as m:  # the second time nothing that generates it runs
            m.setattr(train_cli, "CellSegCLI", None)
            m.setattr(entry, "tool_parser", None)
            assert main(argv) == 0
        assert capsys.readouterr().out == first, argv
    assert len(list((tmp_path / "cache" / "cellseg_pl" / "help").glob("*.txt"))) == 3
    # only a plain `<command> --help`: other arguments change it (a --config sets the defaults)
    assert help_cache.is_plain_help(["fit", "--help"]) and help_cache.is_plain_help(["cycle", "init", "-h"])
    assert not help_cache.is_plain_help(["fit", "--config", "c.yaml", "--help"])
    assert not help_cache.is_plain_help(["cycle", "--help"]) and not help_cache.is_plain_help(["fit"])
    # an edit of the package makes a new key; a failing help is not kept; an unwritable cache is skipped
    key = help_cache.cache_key(["fit", "--help"], None)
    monkeypatch.setattr(help_cache.Path, "stat", lambda self, **kw: os.stat_result((0,) * 8 + (1, 1)))
    assert help_cache.cache_key(["fit", "--help"], None) != key
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    monkeypatch.delenv("CELLSEG_PL_NO_HELP_CACHE", raising=False)
    assert main(["no-such-command", "--help"]) != 0
    assert not (tmp_path / "cache2" / "cellseg_pl" / "help").exists() or not list(
        (tmp_path / "cache2" / "cellseg_pl" / "help").glob("*.txt"))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the folder would go
    capsys.readouterr()
    assert main(["export", "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: ") and err == ""


def test_convert_imports_neither_torch_nor_lightning(tmp_path):
    """convert (and its --help) load no torch, torchvision, Lightning or Ultralytics: a zip converts at once."""
    import subprocess
    import sys

    from benchmarks.active_learning import true_labels_zip
    from cellseg_pl.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_train=3, n_val=1, size=64, seed=0)
    images = data.parent / "images" / "train"
    zip_path = true_labels_zip(sorted(images.iterdir()), {0: "cell"}, tmp_path / "export.zip")
    code = f"""
import sys
from cellseg_pl.__main__ import main
assert main(["convert", "--help"]) == 0
assert main(["convert", "--coco-zip", {str(zip_path)!r}, "--images-dir", {str(images)!r},
             "--output-dir", {str(tmp_path / "out")!r}]) == 0
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "torchvision", "lightning", "ultralytics",
                                                         "torchmetrics", "albumentations"}})
print("HEAVY", heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert (tmp_path / "out" / "dataset.yaml").is_file()


def test_overview_lists_every_command_and_no_argparse_is_left(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "convert", "export", "select"):
        assert f"  {command}" in text, command
    package = Path(__file__).resolve().parents[1] / "cellseg_pl"
    assert [p.name for p in package.glob("*.py") if "import argparse" in p.read_text()] == []


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
    from cellseg_pl.yolo.network import build_network, load_weights

    assert main(fit_args(tiny_data, tmp_path, "first", 1)) == 0
    ckpt = tmp_path / "first" / "weights" / "last.ckpt"
    source, names, _ = load_weights(ckpt)
    net = build_network(str(ckpt), 1, {0: "cell"})
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items())  # starts from the EMA weights
    assert main(fit_args(tiny_data, tmp_path, "second", 1, "--model.model", str(ckpt))) == 0
    assert (tmp_path / "second" / "weights" / "last.ckpt").is_file()


# ---------------------------------------------------------------------------------------------- bad input (issue 12)


def error_line(code: int, err: str, *needles: str) -> str:
    """rc 2, exactly one ``error:`` line (the last), no traceback, naming each needle; returns the line."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def ckpt_files(tmp_path_factory) -> dict[str, str]:
    """What ``--ckpt_path`` may be given: a 1-class and a 2-class checkpoint, and broken files."""
    from cellseg_pl.train.module import CellSegModule

    root = tmp_path_factory.mktemp("ckpts")
    files = {}
    for nc in (1, 2):
        module = CellSegModule(num_classes=nc, class_names={i: f"c{i}" for i in range(nc)}, ema=False)
        files[f"nc{nc}"] = root / f"nc{nc}.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, files[f"nc{nc}"])
    data = files["nc1"].read_bytes()
    files["truncated"], files["empty"] = root / "truncated.ckpt", root / "empty.ckpt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"] = root / "notes.ckpt"
    files["text"].write_text("not a checkpoint\n")
    files["pickle"] = root / "other.ckpt"
    torch.save({"model": torch.nn.Linear(1, 1)}, files["pickle"])  # a pickled module: what weights_only refuses
    files["missing"] = root / "missing.ckpt"
    return {k: str(v) for k, v in files.items()}


def lightning_args(sub: str, data, project, *extra: str) -> list[str]:
    args = fit_args(data, project, "run", 1, *extra)
    args[0] = sub
    if sub == "predict":
        args += ["--data.predict_images", str(data.parent / "images" / "val")]
    return args


@pytest.mark.parametrize("sub", ["fit", "validate", "predict"])
def test_bad_ckpt_path_is_one_error_line_naming_the_file(sub, tiny_data, ckpt_files, tmp_path, capsys):
    cases = {
        "truncated": "is truncated or damaged",
        "empty": "is empty (0 bytes)",
        "text": "is not a readable cellseg_pl checkpoint",
        "pickle": "holds pickled Python objects",
        "missing": "does not exist",
        "nc2": "has 2 classes {0: 'c0', 1: 'c1'} but the data",
    }
    for name, problem in cases.items():
        code = main(lightning_args(sub, tiny_data, tmp_path, "--ckpt_path", ckpt_files[name]))
        line = error_line(code, capsys.readouterr().err, "--ckpt_path: " + ckpt_files[name], problem)
        if name == "nc2":
            assert "has 1 {0: 'cell'}" in line and ("--model.reinit_head" in line) == (sub == "fit")
        assert not (tmp_path / "run").exists()  # no run folder debris (config.yaml, events)


def test_truncated_last_checkpoint_of_a_run_is_named(tiny_data, ckpt_files, tmp_path, capsys):
    weights = tmp_path / "run" / "weights"
    weights.mkdir(parents=True)
    (weights / "last.ckpt").write_bytes(Path(ckpt_files["truncated"]).read_bytes())
    code = main(fit_args(tiny_data, tmp_path, "run", 1, "--ckpt_path", "last"))
    error_line(code, capsys.readouterr().err, "--ckpt_path last: ", "weights/last.ckpt is truncated")
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["last.ckpt", "weights"]


def test_sizes_and_devices_are_one_error_line(tiny_data, tmp_path, capsys):
    cases = [
        ("fit", ["--data.imgsz", "0"], ["--data.imgsz: 0 is not a positive multiple of 32"]),
        ("validate", ["--data.imgsz", "-32"], ["--data.imgsz: -32 is not a positive multiple of 32"]),
        ("fit", ["--data.imgsz", "33"], ["--data.imgsz: 33 is not a positive multiple of 32"]),  # the data module's check
        ("fit", ["--data.batch_size", "0"], ["--data.batch_size", "0"]),
        ("fit", ["--trainer.strategy", "no_such_strategy"], ["--trainer.strategy no_such_strategy"]),
    ]
    if not torch.cuda.is_available():
        cases += [
            ("fit", ["--trainer.accelerator", "cuda"], ["--trainer.accelerator cuda", "--trainer.accelerator cpu"]),
            ("validate", ["--trainer.accelerator", "gpu", "--trainer.devices", "[7]"], ["--trainer.devices [7]"]),
        ]
    for sub, extra, needles in cases:
        code = main(lightning_args(sub, tiny_data, tmp_path, *extra))
        error_line(code, capsys.readouterr().err, *needles)
    assert not (tmp_path / "run").exists()


def test_default_root_dir_other_than_the_run_folder_is_refused(tiny_data, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere" / "exp"
    code = main(fit_args(tiny_data, tmp_path, "run", 1, "--trainer.default_root_dir", str(elsewhere)))
    error_line(code, capsys.readouterr().err, "--trainer.default_root_dir", str(elsewhere),
               f"--project {elsewhere.parent} --name exp")
    assert not elsewhere.exists() and not (tmp_path / "run").exists()


def test_default_root_dir_equal_to_the_run_folder_or_from_an_old_config_is_used(tiny_data, tmp_path):
    from cellseg_pl.train.cli import CellSegCLI

    same = fit_args(tiny_data, tmp_path, "run", 1, "--trainer.default_root_dir", str(tmp_path / "run"))
    cli = CellSegCLI(args=same[1:], run=False)
    assert cli.run_dir == tmp_path / "run" and cli.trainer.default_root_dir == str(tmp_path / "run")
    from cellseg_pl.train.callbacks import FileCheckpointIO

    assert isinstance(cli.trainer.strategy.checkpoint_io, FileCheckpointIO)  # a fit writes checkpoints straight
    # a config.yaml saved by an earlier version holds both derived folders of its own run; re-run under a new name
    old = tmp_path / "old"
    args = fit_args(tiny_data, tmp_path, "new", 1, "--trainer.default_root_dir", str(old),
                    "--checkpoint.dirpath", str(old / "weights"))
    cli = CellSegCLI(args=args[1:], run=False)
    assert cli.run_dir == tmp_path / "new" and cli.trainer.default_root_dir == str(tmp_path / "new")


def test_failed_fit_before_its_first_checkpoint_leaves_no_run_folder(tiny_data, tmp_path, capsys, monkeypatch):
    project = tmp_path / "new_project"
    code = main(fit_args(tiny_data, project, "run", 1, "--trainer.max_epochs", "-1"))  # fails in configure_optimizers
    error_line(code, capsys.readouterr().err, "--trainer.max_epochs")
    assert not project.exists()

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(CellSegModule, "training_step", boom)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")  # a folder the user made: kept, with their file
    with pytest.raises(RuntimeError, match="boom"):
        main(fit_args(tiny_data, tmp_path, "run", 1))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]  # no config.yaml, events, pictures


def test_failed_fit_files_are_kept_once_a_checkpoint_exists(tmp_path):
    from cellseg_pl.train.run_dir import remove_failed_fit_files

    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    (run / "weights" / "last.ckpt").write_bytes(b"x")
    remove_failed_fit_files(run, None)
    assert (run / "config.yaml").is_file() and (run / "weights" / "last.ckpt").is_file()
    (run / "weights" / "last.ckpt").unlink()
    remove_failed_fit_files(run, {run / "weights"})
    assert sorted(p.name for p in run.iterdir()) == ["weights"]


def test_val_of_an_ultralytics_pt_reads_its_data_from_train_args(tiny_data, tmp_path, capsys):
    """``val --model.model best.pt`` alone, as ``yolo segment val model=best.pt``: data and imgsz from the file."""
    import torch

    from cellseg_pl.yolo.network import build_network, save_ultralytics_checkpoint

    torch.manual_seed(0)
    pt = tmp_path / "best.pt"
    save_ultralytics_checkpoint(build_network("yolov8n-seg.yaml", 1), pt, {0: "cell"},
                                {"data": str(tiny_data.resolve()), "imgsz": 64})
    code = main(["val", "--model.model", str(pt), "--data.num_workers", "0",
                 "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "validation (" in out.out + out.err

    missing = tmp_path / "nodata.pt"
    save_ultralytics_checkpoint(build_network("yolov8n-seg.yaml", 1), missing, {0: "cell"}, {"imgsz": 64})
    code = main(["validate", "--model.model", str(missing)])
    error_line(code, capsys.readouterr().err, "--model.model", "nodata.pt", "records no data set", "--data.dataset")
