"""The predictions JSON read by a real client: Datumaro, CVAT's own dataset library, imports it as ``coco_instances``.

``predict_folder`` runs its real path (NMS, masks at the original size, polygons, JSON) on a stand-in network that
reports every dark disc of the input; Datumaro must then find one item per image (by file name), polygons of >= 3
points inside their image, the labels by name and each detection's score as an attribute.
Needs the ``test`` extra (``pip install -e .[test]``); skipped when Datumaro is not installed.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

datumaro = pytest.importorskip("datumaro")

from cellseg_pl.infer.predict import predict_folder  # noqa: E402

BACKGROUND, DARK = 200, 40


class DarkDiscNet(nn.Module):
    """Stands in for an eval-mode YOLOv8-seg: ``((det, proto), {})`` with one detection per dark blob of the input.

    ``det`` (B, 4 + nc + 32, 32): xywh px, a score of 0.9 - 0.1 k for blob k, one-hot mask coefficients; ``proto``
    (B, 32, S/4, S/4): channel k is +1 inside blob k, -1 elsewhere. Blobs under ``small_area`` px are class 1.
    """

    def __init__(self, names: dict[int, str], small_area: float) -> None:
        super().__init__()
        self.names, self.small_area = names, small_area
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor):
        b, _, s, _ = x.shape
        nc, m = len(self.names), s // 4
        det, proto = torch.zeros(b, 4 + nc + 32, 32), torch.full((b, 32, m, m), -1.0)
        for i in range(b):
            labels, _ = ndimage.label((x[i].mean(0) < 0.3).numpy())  # (the letterbox's grey is 0.45)
            for k, (ys, xs) in enumerate(ndimage.find_objects(labels)[:32]):
                blob = labels == k + 1
                det[i, :4, k] = torch.tensor([(xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2,
                                              xs.stop - xs.start, ys.stop - ys.start])  # fmt: skip
                det[i, 4 + int(blob.sum() < self.small_area), k] = 0.9 - 0.1 * k
                det[i, 4 + nc + k, k] = 1.0
                proto[i, k] = torch.from_numpy(blob.reshape(m, 4, m, 4).mean((1, 3)) * 2 - 1)
        return (det, proto), {}


def write_image(path, height: int, width: int, discs: list[tuple[int, int, int]]) -> None:
    image = np.full((height, width, 3), BACKGROUND, np.uint8)
    for cx, cy, r in discs:
        cv2.circle(image, (cx, cy), r, (DARK, DARK, DARK), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


IMAGES = {  # file name -> (height, width, discs (cx, cy, r)); r 6 discs (~113 px) are droplets
    "a.png": (120, 160, [(40, 40, 18), (110, 70, 16), (140, 105, 6)]),
    "sub/b.png": (96, 80, [(40, 48, 20)]),
}


def test_datumaro_imports_predictions_with_items_polygons_labels_and_scores(tmp_path):
    from datumaro.components.annotation import AnnotationType
    from datumaro.components.dataset import Dataset

    root = tmp_path / "images"
    for name, (h, w, discs) in IMAGES.items():
        write_image(root / name, h, w, discs)
    out = tmp_path / "annotations" / "instances_default.json"  # Datumaro wants the file in annotations/, as CVAT's zips
    predict_folder(DarkDiscNet({0: "cell", 1: "droplet"}, small_area=300), root, out, imgsz=160)
    ours = json.loads(out.read_text())
    scores = {a["id"]: a.get("score") for a in ours["annotations"]}
    assert len(scores) == 4

    dataset = Dataset.import_from(str(out), "coco_instances")  # fails on any malformed item or annotation
    names = [label.name for label in dataset.categories()[AnnotationType.label]]
    assert names == ["cell", "droplet"]
    items = {item.id: item for item in dataset}
    assert sorted(items) == ["a", "sub/b"]  # one per image, by file name (extension dropped, folders kept)
    for name, (h, w, discs) in IMAGES.items():
        item = items[name.rsplit(".", 1)[0]]
        assert item.media.size == (h, w)
        polygons = [a for a in item.annotations if a.type == AnnotationType.polygon]
        assert len(polygons) == len(discs)
        found = []
        for polygon in polygons:
            xy = np.asarray(polygon.points).reshape(-1, 2)
            assert len(xy) >= 3
            assert (xy >= 0).all() and (xy[:, 0] <= w).all() and (xy[:, 1] <= h).all()
            score = polygon.attributes.get("score")  # survives as an attribute
            assert isinstance(score, float) and 0.25 <= score <= 1 and score == scores[polygon.id]
            found.append((float(polygon.get_area()), names[polygon.label]))
        # each disc once, with its label and about its area
        expected = sorted((np.pi * r * r, "droplet" if r == 6 else "cell") for _, _, r in discs)
        assert [label for _, label in sorted(found)] == [label for _, label in expected]
        assert [area for area, _ in sorted(found)] == pytest.approx([area for area, _ in expected], rel=0.15)
