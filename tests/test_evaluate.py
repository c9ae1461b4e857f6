"""The one evaluator (:mod:`cellseg_pl.evaluate`): its parts on hand-made label files, and the ``evaluate`` command."""

from __future__ import annotations

import json

import cv2
import numpy as np
import torch

from cellseg_pl.__main__ import main
from cellseg_pl.evaluate import score_image, true_instances
from cellseg_pl.metrics import CellMatchMetrics, mask_map_metric


def test_score_bands_count_true_and_false_positives_by_score(tmp_path):
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.1 0.1 0.4 0.1 0.4 0.4 0.1 0.4\n0 0.6 0.6 0.9 0.6 0.9 0.9 0.6 0.9\n")
    truth, _ = true_instances(image, 40, 40, 1)

    class Found:  # what cellseg_pl.infer.engine.Instance offers the evaluator
        def __init__(self, mask, score):
            self.mask, self.score, self.label = mask, score, 0
            ys, xs = np.nonzero(mask)
            self.area, self.box = int(mask.sum()), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

        def full_mask(self, h, w):
            return self.mask

    stray = np.zeros((40, 40), bool)
    stray[18:22, 2:6] = True  # matches nothing
    found = [Found(truth[0].numpy(), 0.9), Found(truth[1].numpy(), 0.3), Found(stray, 0.5), Found(stray, 0.1)]
    edges = [0.25, 0.4, 0.6, 0.8]
    bands = {f"{lo:.2f}-{hi:.2f}": {"TP": 0, "FP": 0} for lo, hi in zip(edges, [*edges[1:], 1.0])}
    cells = {0.25: CellMatchMetrics(conf=0.25)}
    score_image(image, np.zeros((40, 40, 3)), found, 1, mask_map_metric(), cells, (0.25, edges, bands))
    assert bands == {"0.25-0.40": {"TP": 1, "FP": 0}, "0.40-0.60": {"TP": 0, "FP": 1},
                     "0.60-0.80": {"TP": 0, "FP": 0}, "0.80-1.00": {"TP": 1, "FP": 0}}  # (0.1 is below conf)
    assert {k: float(v) for k, v in cells[0.25].compute().items() if k in ("tp", "fp", "fn")} == \
        {"tp": 2.0, "fp": 1.0, "fn": 0.0}
    assert torch.is_tensor(truth)


def test_true_instances_reads_a_label_file(tmp_path):
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.1 0.1 0.4 0.1 0.4 0.4 0.1 0.4\n0 0.6 0.6 0.9 0.6 0.9 0.9\n")
    masks, labels = true_instances(image, 40, 40, 1)
    assert masks.shape == (2, 40, 40) and masks.dtype == torch.bool and labels.tolist() == [0, 0]
    assert 100 <= int(masks[0].sum()) <= 200


def test_evaluate_command_scores_a_model_on_a_split_and_writes_json(tiny_data, tmp_path, capsys):
    from cellseg_pl.train.module import CellSegModule
    from cellseg_pl.yolo.network import save_ultralytics_checkpoint

    torch.manual_seed(0)
    module = CellSegModule(model="yolov8n-seg.yaml", num_classes=1, class_names={0: "cell"})
    weights = tmp_path / "random.pt"
    save_ultralytics_checkpoint(module.net, weights, {0: "cell"}, {"imgsz": 64})
    out = tmp_path / "scores" / "val.json"
    args = ["evaluate", "--model", str(weights), "--data", str(tiny_data), "--split", "val", "--sweep", "[0.1, 0.5]"]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["images"] == 4 and result["split"] == "val" and result["imgsz"] == 64
    assert set(result["sweep"]) == {"0.1", "0.5"}
    truth = sum(len(line.split()) > 6 for p in (tiny_data.parent / "labels" / "val").glob("*.txt")
                for line in p.read_text().splitlines())
    assert result["TP"] + result["FN"] == truth  # every true cell is found or missed
    assert f"{result['mAP50-95(M)']:.4f}" in printed and "on 4 val images" in printed
    assert main(["evaluate", "--model", str(weights), "--data", str(tiny_data), "--split", "test"]) == 2
    assert capsys.readouterr().err.startswith("error: --data: ")
