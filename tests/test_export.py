""".ckpt -> Ultralytics .pt -> ultralytics.YOLO predicts what cellseg_pl predicts; safe export; fine-tune from a .pt.

The Ultralytics ``best.pt`` here is made by Ultralytics' own trainer (1 epoch on tiny data), as the lab's
``yolov8s_cells_v1.0.pt`` was; everything runs under the network guard of ``conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch
import yaml

from cellseg_pl.__main__ import main
from cellseg_pl.data.dataset import Collate, YoloSegDataset
from cellseg_pl.data.images import list_images
from cellseg_pl.data.transforms import ValTransform
from cellseg_pl.data.demo import make_demo_dataset
from cellseg_pl.train.export import export_model
from cellseg_pl.yolo.network import load_weights, split_outputs
from cellseg_pl.train.module import CellSegModule
from cellseg_pl.yolo.postprocess import postprocess, to_original

from conftest import calibrate_batchnorm, fit_args

IMGSZ = 128
# an untrained network scores everything low: a low threshold gives detections to compare
CONF, IOU = 0.001, 0.7

_BUILT: dict[str, Any] = {}


@pytest.fixture
def built(tmp_path_factory, no_network) -> dict[str, Any]:
    """Built once for the module, under the network guard (hence function scope + a cache).

    ``data``: a 1-class data set; ``data2``: the same with 2 classes; ``pt``: a ``best.pt`` of Ultralytics'
    trainer; ``ckpt``: a cellseg_pl ``best.ckpt`` (1 epoch).
    """
    if not _BUILT:
        from ultralytics import YOLO

        root = tmp_path_factory.mktemp("export")
        data = make_demo_dataset(root / "data", n_train=8, n_val=4, size=IMGSZ, seed=3)
        data2 = make_demo_dataset(root / "data2", n_train=8, n_val=4, size=IMGSZ, seed=3)
        spec = yaml.safe_load(data2.read_text())
        spec["names"] = {0: "cell", 1: "droplet"}
        data2.write_text(yaml.safe_dump(spec))
        YOLO("yolov8n-seg.yaml").train(
            data=str(data), epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, amp=False,
            val=False, project=str(root / "ultralytics"), name="u", exist_ok=True, deterministic=False, verbose=False,
        )
        pt = root / "ultralytics" / "u" / "weights" / "best.pt"
        assert main(fit_args(data, root / "runs", "run", 1)) == 0
        ckpt = root / "runs" / "run" / "weights" / "best.ckpt"
        calibrate_batchnorm(ckpt, sorted((data.parent / "images").rglob("*.png")))
        _BUILT.update(root=root, data=data, data2=data2, pt=pt, ckpt=ckpt)
    return _BUILT


# ------------------------------------------------------------------------------------------------ helpers
def ours(weights: Path, data: Path, images: Path) -> list[dict[str, torch.Tensor]]:
    """cellseg_pl's predictions: its predict loader (letterbox), network, postprocess and to_original."""
    net, names, _ = load_weights(weights)
    net = net.fuse(verbose=False)  # as cellseg_pl.infer.predict and Ultralytics' predictor run it: Conv+BN folded
    dataset = YoloSegDataset(list_images(images), len(names), IMGSZ, ValTransform(IMGSZ))
    out = []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=Collate()):
            det, proto, _ = split_outputs(net(batch["img"].float() / 255))
            for i, r in enumerate(postprocess(det, proto, len(names), CONF, IOU, 300)):
                o = to_original(r, proto[i], tuple(batch["img"].shape[-2:]), tuple(batch["ori_shape"][i]))
                keep = o["masks"].flatten(1).any(1)  # Ultralytics drops detections whose mask is empty
                out.append({k: v[keep] for k, v in o.items()} | {"file": batch["im_file"][i]})
    return out


def theirs(pt: Path, images: Path, **kwargs: Any) -> list[Any]:
    from ultralytics import YOLO

    files = sorted(str(p) for p in images.iterdir())
    return YOLO(str(pt)).predict(files, imgsz=IMGSZ, conf=CONF, iou=IOU, retina_masks=True, device="cpu",
                                 verbose=False, **kwargs)


def compare(mine: list[dict], results: list[Any]) -> dict[str, float]:
    """Match detections image by image (greedy, by box IoU plus mask IoU: near-identical boxes are told apart by
    their masks); returns counts, max box difference, mask IoUs."""
    from torchvision.ops import box_iou

    assert [Path(m["file"]).name for m in mine] == [Path(r.path).name for r in results]
    n, box_diff, ious, cell_ious = 0, 0.0, [], []
    for m, r in zip(mine, results):
        boxes = r.boxes.xyxy
        assert len(boxes) == len(m["boxes"]), f"{r.path}: {len(boxes)} detections vs our {len(m['boxes'])}"
        if not len(boxes):
            continue
        masks = r.masks.data.bool()
        a, b = m["masks"].flatten(1).float(), masks.flatten(1).float()
        inter = a @ b.T
        mask_iou = inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter).clamp(min=1)
        overlap = box_iou(m["boxes"], boxes) + mask_iou
        free = torch.ones(len(boxes), dtype=torch.bool)
        for i in torch.argsort(m["scores"], descending=True).tolist():
            j = int(torch.where(free, overlap[i], torch.tensor(-1.0)).argmax())
            free[j] = False
            box_diff = max(box_diff, float((m["boxes"][i] - boxes[j]).abs().max()))
            iou = float(mask_iou[i, j])
            ious.append(iou)
            if m["masks"][i].sum() >= 100:  # a cell; on specks of a few px one rounding-flipped pixel costs 5% IoU
                cell_ious.append(iou)
        n += len(boxes)
    return {"n": n, "box_diff": box_diff, "iou_min": min(cell_ious, default=1.0), "iou_mean": sum(ious) / max(len(ious), 1)}


# ------------------------------------------------------------------------------------------------ export
def test_round_trip_ultralytics_predicts_our_masks_and_boxes(built, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything Ultralytics writes stays here
    pt = export_model(built["ckpt"], tmp_path / "models" / "cells_v2.0.pt")
    val_images = built["data"].parent / "images" / "val"
    stats = compare(ours(built["ckpt"], built["data"], val_images), theirs(pt, val_images))
    assert stats["n"] > 0, "no detections to compare"
    assert stats["box_diff"] <= 1.0 and stats["iou_min"] >= 0.99, stats
    # float32 export: the very same network, so the same result up to float rounding
    assert stats["box_diff"] < 1e-2 and stats["iou_min"] >= 0.999, stats

    # a non-square image: Ultralytics' predict pads to a multiple of 32 by default (rect), we pad to a square;
    # with rect=False both letterbox alike
    wide = tmp_path / "wide"
    wide.mkdir()
    for p in sorted(val_images.iterdir()):
        cv2.imwrite(str(wide / p.name), cv2.imread(str(p))[: IMGSZ * 3 // 4 + 1])
    stats = compare(ours(built["ckpt"], built["data"], wide), theirs(pt, wide, rect=False))
    assert stats["n"] > 0 and stats["box_diff"] < 1e-2 and stats["iou_min"] >= 0.99, stats
    assert stats["iou_mean"] >= 0.999, stats


def test_exported_file_is_an_ultralytics_model(built, tmp_path, monkeypatch):
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "folder" / "cells_v2.0.pt"
    assert main(["export", "--ckpt", str(built["ckpt"]), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["cells_v2.0.pt"]  # no temporary file left
    saved = torch.load(out, map_location="cpu", weights_only=False)
    assert saved["train_args"]["imgsz"] == IMGSZ and saved["train_args"]["data"] == str(built["data"].resolve())
    assert saved["train_args"]["task"] == "segment" and saved["train_args"]["degrees"] == 180.0
    assert next(saved["model"].parameters()).dtype == torch.float32
    model = YOLO(str(out))
    assert model.task == "segment" and model.names == {0: "cell"}
    # `yolo segment val model=<file>`: data and imgsz come from the file's train_args
    metrics = model.val(batch=4, device="cpu", plots=False, workers=0, project=str(tmp_path), name="val")
    assert 0.0 <= metrics.seg.map50 <= 1.0

    half = tmp_path / "cells_v2.0_half.pt"
    assert main(["export", "--ckpt", str(built["ckpt"]), "--output", str(half), "--half"]) == 0
    assert next(torch.load(half, map_location="cpu", weights_only=False)["model"].parameters()).dtype == torch.float16


def test_never_overwrites_a_model(built, tmp_path, capsys):
    out = tmp_path / "models" / "cells_v2.0.pt"
    out.parent.mkdir()
    out.write_bytes(b"the lab's current model")
    assert main(["export", "--ckpt", str(built["ckpt"]), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --output: ") and "already exists" in err[0]
    assert "cells_v2.1.pt" in err[0]  # a new version name is suggested
    assert out.read_bytes() == b"the lab's current model"
    assert sorted(p.name for p in out.parent.iterdir()) == ["cells_v2.0.pt"]


@pytest.mark.parametrize(
    "key, value", [("model.0.conv.weight", float("nan")), ("model.2.m.0.cv1.bn.running_var", float("inf"))]
)
def test_refuses_non_finite_weights(built, tmp_path, capsys, key, value):
    ckpt = torch.load(built["ckpt"], map_location="cpu", weights_only=True)
    for prefix in ("net.", "ema.module."):
        ckpt["state_dict"][prefix + key].view(-1)[0] = value
    bad = tmp_path / "diverged.ckpt"
    torch.save(ckpt, bad)
    out = tmp_path / "models" / "cells_v2.0.pt"
    assert main(["export", "--ckpt", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN/Inf weights in 1 tensors" in err[0] and key in err[0]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_a_file_where_the_output_folder_must_be_is_named(built, tmp_path, capsys):
    (tmp_path / "f").write_text("notes")
    for out in (tmp_path / "f" / "m.pt", tmp_path / "f" / "deeper" / "m.pt"):
        assert main(["export", "--ckpt", str(built["ckpt"]), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --output {out}: {tmp_path / 'f'} is a file, not a folder; choose an --output outside "
                       f"it, or move the file away"]
    assert (tmp_path / "f").read_text() == "notes"


def test_failed_write_leaves_nothing(built, tmp_path, capsys, monkeypatch):
    def broken_save(net, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("cellseg_pl.train.export.save_ultralytics_checkpoint", broken_save)
    out = tmp_path / "cells_v2.0.pt"
    assert main(["export", "--ckpt", str(built["ckpt"]), "--output", str(out)]) == 2
    assert "writing" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt", "nope/best.ckpt", "--output", "m.pt"], "error: --ckpt: nope/best.ckpt does not exist"),
        (["--ckpt", "{ckpt}", "--output", "m.onnx"], "error: --output: m.onnx must end in .pt"),
        (["--ckpt", "{yaml}", "--output", "m.pt"], "expected a cellseg_pl .ckpt or an Ultralytics .pt"),
    ],
)
def test_clear_errors(built, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.format(ckpt=built["ckpt"], yaml=built["data"]) for a in args]
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_broken_checkpoint_files_are_one_line_naming_the_file(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(10000)}}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    files = {
        "empty.ckpt": (b"", "is empty (0 bytes)"),
        "cut.ckpt": (data[: len(data) // 2], "is truncated or damaged"),
        "notes.ckpt": (b"not a checkpoint", "is not a readable cellseg_pl checkpoint"),
        "whole.ckpt": (data, "is a PyTorch file but not a cellseg_pl checkpoint"),
        "notes.pt": (b"not a pickle", "is not a readable PyTorch model file"),
    }
    for name, (content, problem) in files.items():
        (tmp_path / name).write_bytes(content)
        assert main(["export", "--ckpt", str(tmp_path / name), "--output", str(tmp_path / "m.pt")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --ckpt: {tmp_path / name} {problem}"), err
        assert "--model.model" not in err[0]
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------------------------------------ fine-tune
@pytest.fixture
def start_weights(monkeypatch) -> dict[str, torch.Tensor]:
    """The network's tensors when training starts (filled by a patched ``on_train_start``)."""
    captured: dict[str, torch.Tensor] = {}
    original = CellSegModule.on_train_start

    def capture(self):
        captured.update({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        original(self)

    monkeypatch.setattr(CellSegModule, "on_train_start", capture)
    return captured


def ultralytics_tensors(pt: Path) -> dict[str, torch.Tensor]:
    return torch.load(pt, map_location="cpu", weights_only=False)["model"].float().state_dict()


def test_finetune_from_ultralytics_pt(built, tmp_path, start_weights, monkeypatch):
    pt = tmp_path / "yolov8s_cells_v1.0.pt"
    shutil.copy(built["pt"], pt)
    assert main(fit_args(built["data"], tmp_path, "ft", 1, "--model.model", str(pt))) == 0
    source = ultralytics_tensors(pt)
    assert start_weights.keys() == source.keys()
    assert all(torch.equal(start_weights[k], source[k]) for k in source)
    ckpt = torch.load(tmp_path / "ft" / "weights" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == {0: "cell"}
    # the run reloads without the .pt, and exports with the class names
    pt.unlink()
    monkeypatch.chdir(tmp_path)
    from ultralytics import YOLO

    out = export_model(tmp_path / "ft" / "weights" / "best.ckpt", tmp_path / "yolov8s_cells_v2.0.pt")
    assert YOLO(str(out)).names == {0: "cell"}


def test_class_count_mismatch_is_one_clear_line(built, tmp_path, capsys):
    code = main(fit_args(built["data2"], tmp_path, "mm", 1, "--model.model", str(built["pt"])))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    line = err[-1]
    assert line.startswith("error: --model.model: ") and "predicts 1 classes" in line and "the data has 2" in line
    assert "--model.reinit_head true" in line
    assert not (tmp_path / "mm" / "weights").exists()


def test_reinit_head_keeps_every_other_weight(built, tmp_path, start_weights):
    args = fit_args(built["data2"], tmp_path, "re", 1, "--model.model", str(built["pt"]), "--model.reinit_head", "true")
    assert main(args) == 0
    source = ultralytics_tensors(built["pt"])
    assert start_weights.keys() == source.keys()
    changed = {k for k in source if start_weights[k].shape != source[k].shape}
    # only the last conv of each class branch changes shape: 1 -> 2 outputs
    assert changed and all(".cv3." in k and k.rsplit(".", 2)[-2] == "2" for k in changed), changed
    assert all(start_weights[k].shape[0] == 2 for k in changed)
    assert all(torch.equal(start_weights[k], source[k]) for k in source if k not in changed)
    ckpt = torch.load(tmp_path / "re" / "weights" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == {0: "cell", 1: "droplet"}


def test_other_class_names_warn(built, caplog):
    from cellseg_pl.yolo.network import build_network

    with caplog.at_level("WARNING", logger="cellseg_pl.yolo.network"):
        net = build_network(str(built["pt"]), 1, {0: "blob"})
    assert net.names == {0: "blob"}
    assert "was trained on classes {0: 'cell'}, the data names them {0: 'blob'}" in caplog.text


def test_stale_partial_files_of_killed_exports_are_removed(tmp_path, caplog):
    import os
    import subprocess
    import sys

    from cellseg_pl.files import remove_stale_partials

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has ended
    stale = tmp_path / f".yolov8s_cells_v2.0.pt.partial-{pid}"
    stale.write_bytes(b"half a model")
    running = tmp_path / f".yolov8s_cells_v2.1.pt.partial-{os.getpid()}"  # an export still running
    running.write_bytes(b"being written")
    theirs = [tmp_path / f".notes.txt.partial-{pid}", tmp_path / f"yolov8s.pt.partial-{pid}", tmp_path / "x.pt"]
    for path in theirs:
        path.write_bytes(b"not ours")
    caplog.set_level("WARNING", logger="cellseg_pl")
    assert remove_stale_partials(tmp_path, ".pt", "a killed export") == [stale]
    assert not stale.exists() and running.exists() and all(p.exists() for p in theirs)
    assert f"removed {stale}, left by a killed export (pid {pid}, no longer running)" in caplog.text


def test_every_half_written_file_has_one_naming_scheme(tmp_path):
    import os

    from cellseg_pl.files import PARTIAL_RE, partial_path

    pid = os.getpid()
    for path, kind, tag in ((tmp_path / "best.pt", "partial", ""), (tmp_path / "a.b.npz", "partial", 7),
                            (tmp_path / "data-v1", "convert-staging", ""), (tmp_path / "data", "convert-old", "")):
        made = partial_path(path, kind, tag)
        assert made.parent == path.parent and made.name.startswith(".")
        match = PARTIAL_RE.match(made.name)
        assert match and (match["name"], match["kind"], int(match["pid"]), match["tag"] or "") == \
            (path.name, kind, pid, str(tag))
    assert not PARTIAL_RE.match("best.pt") and not PARTIAL_RE.match(".best.pt")
