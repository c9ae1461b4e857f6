"""``yolo segment train`` arguments -> cellseg_pl options: the guide's command, every mapping rule, clear errors."""

from __future__ import annotations

import contextlib
import io
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from cellseg_pl.__main__ import main as cellseg_main
from cellseg_pl.errors import YoloArgError
from cellseg_pl.train.yolo_arg_table import TABLE
from cellseg_pl.train.yolo_args import GUIDE_STEP3, markdown_table, main, to_cli_args

ROOT = Path(__file__).resolve().parents[1]

#: Step 3 of the lab's guide, exactly as printed there.
GUIDE_TEXT = r"""
yolo segment train \
    data=cell-analyzer/ml-data/training_data/subset_200/dataset.yaml \
    model=cell-analyzer/ml-data/models/yolov8s_cells_v1.0.pt \
    epochs=100 \
    imgsz=640 \
    batch=8 \
    device=0 \
    project=cell-analyzer/ml-data/training_runs \
    name=yolov8s_cells_v2.0 \
    patience=20 \
    lr0=0.0005 \
    augment=True \
    degrees=180.0 \
    scale=0.5 \
    flipud=0.5 \
    fliplr=0.5 \
    mosaic=1.0 \
    copy_paste=0.3
"""


def options(cli: list[str]) -> dict[str, str]:
    assert cli[0] == "fit"
    pairs = cli[1:]
    assert len(pairs) % 2 == 0 and all(k.startswith("--") for k in pairs[::2]), cli
    assert len(set(pairs[::2])) == len(pairs) // 2, f"an option is set twice: {cli}"
    return dict(zip(pairs[::2], pairs[1::2]))


def test_guide_step3_command_maps_to_expected_options():
    argv = shlex.split(GUIDE_TEXT.replace("\\\n", " "))  # the shell joins backslash-continued lines
    assert argv[0] == "yolo"
    cli, notes = to_cli_args(argv[1:], cuda_available=True)
    assert options(cli) == {
        "--data.dataset": "cell-analyzer/ml-data/training_data/subset_200/dataset.yaml",
        "--model.model": "cell-analyzer/ml-data/models/yolov8s_cells_v1.0.pt",
        "--trainer.max_epochs": "100",
        "--data.imgsz": "640",
        "--data.batch_size": "8",
        "--trainer.accelerator": "gpu",
        "--trainer.devices": "[0]",
        "--project": "cell-analyzer/ml-data/training_runs",
        "--name": "yolov8s_cells_v2.0",
        "--early_stopping.patience": "20",
        "--model.lr0": "0.0005",
        "--data.degrees": "180.0",
        "--data.scale": "0.5",
        "--data.flipud": "0.5",
        "--data.fliplr": "0.5",
        "--data.mosaic": "1.0",
        "--data.copy_paste": "0.3",
        # Ultralytics' defaults for what the command leaves out and that changes the trained model
        "--seed_everything": "0",
        "--trainer.deterministic": "warn",
        "--trainer.precision": "16-mixed",
    }
    text = "\n".join(notes)
    assert "augment=True" in text and "test-time augmentation" in text
    assert "lr0=0.0005" in text and "optimizer=auto" in text
    # the same with `yolo` kept, or without `segment train`
    assert to_cli_args(argv, cuda_available=True)[0] == cli
    assert to_cli_args(argv[3:], cuda_available=True)[0] == cli
    assert argv[3:] == GUIDE_STEP3[2:]


def _resolved_config(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cellseg_main([*args, "--print_config"])
    return yaml.safe_load(out.getvalue())


def test_finetune_config_is_the_guide_command():
    from_config = _resolved_config(["fit", "--config", str(ROOT / "configs" / "finetune_v2.yaml")])
    from_command = _resolved_config(to_cli_args(GUIDE_STEP3, cuda_available=True)[0])
    assert from_config == from_command
    assert from_config["model"]["optimizer"] == "auto" and from_config["model"]["lr0"] == 0.0005


@pytest.mark.parametrize(
    "arg, message",
    [
        ("epochs=abc", "epochs=abc: expected a whole number"),
        ("epochs100", "epochs100: expected key=value"),
        ("epochs=", "epochs=: no value"),
        ("cache=gpu", "cache=gpu: expected True, ram, disk or False"),
        ("degree=180", "did you mean degrees?"),
        ("flipud=1.5", "flipud=1.5: expected a fraction between 0 and 1"),
        ("batch=-1", "batch=-1: expected a whole number of images"),
        ("batch=0.7", "batch=0.7: expected a whole number of images"),
        ("device=-1", "device=-1: expected cpu, mps, a GPU index"),
        ("optimizer=RMSProp", "optimizer=RMSProp: cellseg_pl supports SGD, Adam, AdamW, MuSGD, auto"),
        ("exist_ok=True", "exist_ok=True: cellseg_pl never writes into an earlier run's folder"),
        ("val=False", "val=False: cellseg_pl validates every epoch"),
        ("resume=runs/segment/train/weights/last.pt", "resume=runs/segment/train/weights/last.pt: cellseg_pl resumes"),
        ("task=detect", "task=detect: train_yolov8.py runs 'segment' only"),
        ("cos_lr=yes", "cos_lr=yes: expected True or False"),
    ],
)
def test_bad_argument_is_named(arg, message):
    with pytest.raises(YoloArgError) as err:
        to_cli_args(["segment", "train", "data=d.yaml", arg])
    assert message in str(err.value)


def test_repeated_argument_and_other_modes_are_errors():
    with pytest.raises(YoloArgError, match="epochs: given twice"):
        to_cli_args(["epochs=3", "epochs=4"])
    with pytest.raises(YoloArgError, match="segment val: train_yolov8.py runs 'yolo segment train' only"):
        to_cli_args(["segment", "val", "data=d.yaml"])


def test_bad_argument_exits_2_with_one_line(capsys):
    assert main(["segment", "train", "data=d.yaml", "epochs=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: epochs=abc: expected a whole number, e.g. epochs=100"]


def test_gpu_that_this_machine_does_not_have_is_named():
    with pytest.raises(YoloArgError, match=r"^device=7: this machine has no CUDA GPU; use device=cpu"):
        to_cli_args(["data=d.yaml", "device=7"], gpu_count=0)
    with pytest.raises(YoloArgError, match=r"^device=0,3: this machine has 2 CUDA GPU\(s\): device=0..1"):
        to_cli_args(["data=d.yaml", "device=0,3"], gpu_count=2)
    assert options(to_cli_args(["data=d.yaml", "device=1"], gpu_count=2)[0])["--trainer.devices"] == "[1]"
    assert options(to_cli_args(["data=d.yaml", "device=cpu"], gpu_count=0)[0])["--trainer.accelerator"] == "cpu"


def test_gpu_that_this_machine_does_not_have_exits_2_with_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["segment", "train", "data=d.yaml", "device=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: device=7: this machine has no CUDA GPU; use device=cpu to train on the CPU"]


def test_batch_is_divided_over_devices():
    cli, notes = to_cli_args(["batch=16", "device=0,1"])
    o = options(cli)
    assert o["--data.batch_size"] == "8" and o["--trainer.devices"] == "[0, 1]" and o["--trainer.accelerator"] == "gpu"
    assert any("total over 2 devices: 8 per device" in n for n in notes)
    cli, notes = to_cli_args(["batch=15", "device=[0,1]"])
    assert options(cli)["--data.batch_size"] == "7" and any("1 dropped" in n for n in notes)
    with pytest.raises(YoloArgError, match="fewer images than the 2 devices"):
        to_cli_args(["batch=1", "device=0,1"])


@pytest.mark.parametrize(
    "args, cuda, expected",
    [
        ([], False, {"--trainer.accelerator": "cpu", "--trainer.devices": "1", "--trainer.precision": "32-true"}),
        ([], True, {"--trainer.accelerator": "gpu", "--trainer.devices": "[0]", "--trainer.precision": "16-mixed"}),
        (["device=cpu", "amp=True"], True, {"--trainer.accelerator": "cpu", "--trainer.precision": "32-true"}),
        (["device=cuda:1", "amp=False"], True, {"--trainer.devices": "[1]", "--trainer.precision": "32-true"}),
        (["device=0", "amp=bf16"], True, {"--trainer.precision": "bf16-mixed"}),
        (["device=mps"], False, {"--trainer.accelerator": "mps", "--trainer.precision": "32-true"}),
        (["seed=7", "deterministic=False"], False, {"--seed_everything": "7", "--trainer.deterministic": "false"}),
        (["imgsz=600"], False, {"--data.imgsz": "608"}),
        (["overlap_mask=False", "cos_lr=True", "optimizer=adamw"],
         False, {"--data.overlap_mask": "false", "--model.cos_lr": "true", "--model.optimizer": "AdamW"}),
    ],
)
def test_device_precision_and_defaults(args, cuda, expected):
    o = options(to_cli_args(args, cuda_available=cuda)[0])
    assert {k: o.get(k) for k in expected} == expected


def test_every_simple_knob_maps_to_its_option():
    knobs = {s.key: s for s in TABLE if s.simple and s.option.startswith(("--model.", "--data."))}
    assert {"lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "nbs",
            "box", "cls", "dfl", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
            "flipud", "fliplr", "mosaic", "mixup", "copy_paste", "close_mosaic", "mask_ratio", "workers"} <= set(knobs)
    argv = []
    for key, spec in knobs.items():
        for value in ("0.001", "1", "True"):  # the first value this knob accepts
            try:
                spec.parse(key, value)
            except YoloArgError:
                continue
            argv.append(f"{key}={value}")
            break
    o = options(to_cli_args(argv)[0])
    for item in argv:
        key, value = item.split("=")
        expected = {"cache": "ram"}.get(key, value.lower() if value == "True" else value)  # (cache=True: RAM)
        assert o[knobs[key].option] == expected, key


def test_accepted_no_ops_say_why():
    cli, notes = to_cli_args(["plots=False", "verbose=True", "augment=True", "half=True", "exist_ok=False",
                              "val=True", "task=segment", "mode=train"])
    assert not any(k in " ".join(cli) for k in ("plots", "verbose", "augment", "half", "exist_ok"))
    for key in ("plots", "verbose", "augment", "half"):
        assert any(n.startswith(f"{key}=") for n in notes), key


def test_resume(tmp_path):
    run = tmp_path / "runs" / "v2"
    (run / "weights").mkdir(parents=True)
    (run / "config.yaml").write_text("name: v2\n")
    o = options(to_cli_args(["resume=True", f"project={tmp_path / 'runs'}", "name=v2"])[0])
    assert o["--config"] == str(run / "config.yaml") and o["--ckpt_path"] == "last"
    assert o["--project"] == str(tmp_path / "runs") and o["--name"] == "v2"
    assert "--seed_everything" not in o and "--trainer.precision" not in o  # the run's config.yaml has them
    last = str(run / "weights" / "last.ckpt")
    for argv in ([f"resume={last}"], ["resume=True", f"model={last}"]):
        o = options(to_cli_args(argv)[0])
        assert o["--ckpt_path"] == last and o["--name"] == "v2" and o["--project"] == str(tmp_path / "runs")
        assert "--model.model" not in o


def test_readme_table_is_generated_from_the_table():
    doc = (ROOT / "docs" / "yolo-args.md").read_text()
    assert markdown_table() in doc, "docs/yolo-args.md table is stale: paste cellseg_pl.train.yolo_args.markdown_table()"
    assert "python scripts/train_yolov8.py segment train" in doc


def test_script_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_yolov8.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "scripts" / "train_yolov8.py"), run_name="__main__")
    assert stop.value.code == 0
    assert "yolo segment train" in capsys.readouterr().out


@pytest.fixture
def restore_torch_determinism(monkeypatch):
    """deterministic=True (the yolo default) switches torch's deterministic mode on for the whole process."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored, whatever Lightning sets
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.slow
def test_tiny_run_through_the_script(tiny_data, tmp_path, monkeypatch, capsys, restore_torch_determinism):
    argv = ["segment", "train", f"data={tiny_data}", "epochs=1", "imgsz=128", "batch=4", "workers=0", "device=cpu",
            f"project={tmp_path}", "name=y", "patience=20", "lr0=0.0005", "augment=True", "degrees=180.0",
            "scale=0.5", "flipud=0.5", "fliplr=0.5", "mosaic=1.0", "copy_paste=0.3"]
    monkeypatch.setattr(sys, "argv", ["train_yolov8.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "scripts" / "train_yolov8.py"), run_name="__main__")
    assert stop.value.code == 0
    run = tmp_path / "y"
    assert (run / "results.csv").is_file() and (run / "weights" / "best.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["degrees"] == 180.0 and config["data"]["copy_paste"] == 0.3
    assert config["data"]["batch_size"] == 4 and config["trainer"]["max_epochs"] == 1
    assert config["early_stopping"]["patience"] == 20 and config["model"]["lr0"] == 0.0005
    assert config["seed_everything"] == 0 and config["trainer"]["deterministic"] == "warn"
    assert "running: python -m cellseg_pl fit" in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [("True", "ram"), ("ram", "ram"), ("disk", "disk"), ("False", "none")])
def test_cache_maps_to_data_cache(given, expected):
    args, _ = to_cli_args(["segment", "train", "data=x.yaml", f"cache={given}"])
    assert args[args.index("--data.cache") + 1] == expected


def test_bad_cache_value_is_named():
    with pytest.raises(YoloArgError, match="cache=gpu"):
        to_cli_args(["segment", "train", "data=x.yaml", "cache=gpu"])
