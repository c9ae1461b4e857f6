"""Every command, fed what users really get wrong: garbage, empty or truncated checkpoint files, and a folder with
no image in it (issue 12). Images over the pixel limit are tested per command beside their code
(test_image_limits.py for the scan before training, test_predict.py, test_select.py, test_convert.py).

Each command runs as a user runs it (``python -m cellseg_pl ...`` in a subprocess) and must answer with rc != 0 and
one ``error:`` line that names the file or flag, without a traceback, and without leaving an output behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "YOLO_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cellseg_pl", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_one_error_line(done: subprocess.CompletedProcess, *names: str) -> str:
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "Traceback" not in text, text
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_weights")
    garbage, empty, truncated = root / "garbage.ckpt", root / "empty.pt", root / "truncated.ckpt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 40)
    empty.write_bytes(b"")
    # the first bytes of a real zip-format torch file, cut off
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, buffer)
    truncated.write_bytes(buffer.getvalue()[:300])
    return {"garbage": garbage, "empty": empty, "truncated": truncated}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "images"
    root.mkdir()
    image = np.full((96, 96, 3), 60, np.uint8)
    cv2.circle(image, (40, 50), 12, (200, 200, 200), -1)
    cv2.imwrite(str(root / "good.png"), image)
    return root


def commands(kind: str, weights: Path, data: Path, images: Path, out: Path) -> dict[str, list]:
    return {
        "fit": ["fit", "--data.dataset", data, "--data.imgsz", "64", "--trainer.max_epochs", "1",
                "--data.num_workers", "0", "--project", out, "--name", "run", "--ckpt_path", weights],
        "validate": ["validate", "--data.dataset", data, "--data.imgsz", "64", "--data.num_workers", "0",
                     "--ckpt_path", weights],
        "predict": ["predict", "--model", weights, "--images", images, "--output", out / "predictions.json"],
        "predict (Lightning style)": ["predict", "--data.dataset", data, "--ckpt_path", weights,
                                      "--data.predict_images", images, "--predictions", out / "predictions.json"],
        "select": ["select", "--model", weights, "--pool", images, "--k", "1", "--output", out / "next.txt"],
        "export": ["export", "--ckpt", weights, "--output", out / "model.pt"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated"])
@pytest.mark.parametrize(
    "command", ["fit", "validate", "predict", "predict (Lightning style)", "select", "export"]
)
def test_a_checkpoint_that_is_not_one_gets_one_error_line(command, kind, bad_weights, tiny_data, images, tmp_path):
    if kind != "garbage" and command not in ("fit", "predict", "export"):
        pytest.skip("one kind of bad file per command is enough for the others")
    weights = bad_weights[kind]
    out = tmp_path / "out"
    out.mkdir()
    done = run(*commands(kind, weights, tiny_data, images, out)[command], cwd=tmp_path)
    assert_one_error_line(done, weights.name)
    leftovers = [p for p in out.rglob("*") if p.is_file()]
    assert not leftovers, leftovers  # no run folder, config.yaml, JSON or model was left behind


@pytest.fixture(scope="module")
def random_pt(tmp_path_factory) -> Path:
    """A randomly initialised yolov8n-seg as an Ultralytics ``.pt`` (a valid model that finds nothing in particular)."""
    import torch

    from cellseg_pl.yolo.network import build_network, save_ultralytics_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random_pt") / "random.pt"
    save_ultralytics_checkpoint(build_network("yolov8n-seg.yaml", 1), path, {0: "cell"}, {"imgsz": 64})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "select"])
def test_a_folder_without_images_gets_one_error_line(command, random_pt, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no image here\n")
    out = tmp_path / "out"
    out.mkdir()
    args = {
        "predict": ["predict", "--model", random_pt, "--images", empty, "--output", out / "p.json"],
        "select": ["select", "--model", random_pt, "--pool", empty, "--k", "1", "--output", out / "next.txt"],
    }[command]
    assert_one_error_line(run(*args, cwd=tmp_path), "empty")
    assert not [p for p in out.rglob("*") if p.is_file()]
