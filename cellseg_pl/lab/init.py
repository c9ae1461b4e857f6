"""``cycle init``: make a lab folder (:mod:`cellseg_pl.lab.folder`): the lab's model as v1, the fixed test set set
aside, the fine-tuning recipe."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from cellseg_pl.data.images import list_images
from cellseg_pl.data.labels import label_path_for
from cellseg_pl.files import write_atomic
from cellseg_pl.infer.options import InferenceOptions
from cellseg_pl.lab.card import now, score_on_test, software_versions, write_card
from cellseg_pl.lab.folder import Lab, LabError, LabSettings, labelled_yaml_text, sha256_of


log = logging.getLogger(__name__)

#: The fine-tuning recipe ``cycle init`` writes (``recipe.yaml``, a ``fit`` configuration the lab may edit).
#: AdamW at the guide's lr0 0.0005, with the bias warmup starting there too. Measured through these commands
#: (benchmarks/active_learning.py, 3 seeds x 5 cycles, docs/active-learning.md): against the guide's ``optimizer
#: auto`` (lr0 ignored, AdamW at 0.002, bias warmup from 0.1), final mask mAP50-95 +0.019 (3 of 3 seeds) and F1
#: +0.009; the guide's first fine-tune lost 0.013 F1, this one none.
RECIPE = """\
# The fine-tuning recipe of this lab: `cycle learn` runs
#   python -m cellseg_pl fit --config recipe.yaml --model.model models/<current>.pt --data.dataset labelled.yaml \\
#       --project cycles/cycle<N> --name run
# Edit it as any fit configuration (e.g. trainer.accelerator gpu, trainer.precision bf16-mixed).
seed_everything: 0
trainer:
  max_epochs: {epochs}
  accelerator: auto
  devices: 1
  enable_model_summary: false
model:
  optimizer: AdamW
  lr0: 0.0005
  warmup_bias_lr: 0.0005
  min_area: {min_area}
data:
  imgsz: {imgsz}
  batch_size: {batch_size}
  degrees: 180.0
  scale: 0.5
  flipud: 0.5
  fliplr: 0.5
  mosaic: 1.0
  copy_paste: 0.3
early_stopping:
  patience: {patience}
"""


@dataclass
class InitSummary:
    lab: Path
    version: str
    test_images: int
    test_cells: int
    pool_images: int
    metrics: dict

    def format(self) -> str:
        m = self.metrics
        return "\n".join([
            f"lab folder {self.lab}: {self.version} adopted, {self.test_images} test images ({self.test_cells} cells), "
            f"{self.pool_images} pool images",
            f"{self.version} on the test set: F1 {m['F1'][0]:.3f} [{m['F1'][1]:.3f}, {m['F1'][2]:.3f}], mask mAP50-95 "
            f"{m['mAP50-95'][0]:.3f} [{m['mAP50-95'][1]:.3f}, {m['mAP50-95'][2]:.3f}] (95 % intervals)",
            f"next: python -m cellseg_pl cycle next --lab {self.lab} --k 200",
        ])  # fmt: skip


def cycle_init(
    lab: str,
    model: str,
    pool: str,
    test_zip: str | None = None,
    test_images: str | None = None,
    test_data: str | None = None,
    test_split: str = "test",
    labelled: list[str] | None = None,
    imgsz: int | None = None,
    epochs: int = 100,
    patience: int = 20,
    batch_size: int = 8,
    conf: float = 0.25,
    min_area: float = 0.0,
    device: str = InferenceOptions.device,
) -> InitSummary:
    """Make a lab folder: adopt the lab's model as v1, set the fixed test set aside, write the recipe.

    Args:
        lab: the folder to create (must not exist, or be empty).
        model: the lab's current model (an Ultralytics .pt such as yolov8s_cells_v1.0.pt, or a cellseg_pl .ckpt);
            copied as models/v1.pt.
        pool: folder of unlabelled images the cycles select from.
        test_zip: the test set as a CVAT "COCO 1.0" export (all its images are test images; never trained on).
        test_images: folder with the test zip's images, when the zip has none.
        test_data: the test set as a YOLO-seg dataset.yaml instead (its --test-split images are copied).
        test_split: the split of --test-data that is the test set.
        labelled: dataset.yaml files labelled before the first cycle: every fine-tune trains on them too.
        imgsz: training and inference size (default: the model's own).
        epochs: fine-tuning epochs (recipe.yaml).
        patience: early-stopping patience of a fine-tune (recipe.yaml).
        batch_size: images per training batch (recipe.yaml).
        conf: operating point: F1 and CVAT predictions at this confidence.
        min_area: detections smaller than this many px are dropped from CVAT predictions (the guide: 500).
        device: cpu, 0 (= cuda:0) or cuda:N, for scoring.
    """
    from cellseg_pl.data.dataset import load_dataset_yaml
    from cellseg_pl.train.export import export_model
    from cellseg_pl.yolo.network import load_weights

    lab_ = Lab(lab)
    if lab_.half_made_by_a_dead_process():
        log.warning("removing %s: a lab folder left half-made by a killed cycle init", lab_.root)
        shutil.rmtree(lab_.root)
    if lab_.root.exists() and (not lab_.root.is_dir() or any(lab_.root.iterdir())):
        raise LabError("--lab", f"{lab_.root} exists and is not an empty folder", "pass a new folder")
    pool_dir = Path(pool).expanduser().resolve()
    if not pool_dir.is_dir() or not list_images(pool_dir):
        raise LabError("--pool", f"{pool_dir} is not a folder of images", "pass the folder of unlabelled images")
    if (test_zip is None) == (test_data is None):
        raise LabError("--test-zip", "give the fixed test set once: --test-zip (a CVAT export) or --test-data "
                       "(a dataset.yaml)", "a model is only promoted when it is not worse on it")
    for extra in labelled or []:
        load_dataset_yaml(extra)  # fails with the file's name
    net, names, info = load_weights(model, flag="--model")
    imgsz = int(imgsz or (max(info["imgsz"]) if isinstance(info.get("imgsz"), (list, tuple)) else info.get("imgsz"))
                or 640)
    try:
        lab_.root.mkdir(parents=True, exist_ok=True)
        lab_.incomplete.write_text(f"{os.getpid()}\n")  # removed last: a kill -9 leaves a folder the next init redoes
        test_images_n, test_cells = _make_test_set(lab_, names, test_zip, test_images, test_data, test_split)
        export_model(model, lab_.model(1))
        settings = LabSettings(pool=str(pool_dir), names=dict(names), conf=conf, min_area=min_area,
                               labelled=[str(Path(p).expanduser().resolve()) for p in labelled or []])
        lab_.write_settings(settings)
        write_atomic(lab_.recipe, RECIPE.format(epochs=epochs, min_area=min_area, imgsz=imgsz, batch_size=batch_size,
                                                patience=patience))
        scored = score_on_test(lab_, lab_.model(1), settings, lab_.root / "models" / "v1_test", device)
        card = {
            "version": "v1", "file": "v1.pt", "sha256": sha256_of(lab_.model(1)), "parent": None,
            "created": now(), "adopted_from": str(Path(model).expanduser().resolve()),
            "trained_on": [{"set": "before the lab (adopted)", "data": str(info.get("data") or "unknown")}],
            "cycle": 0, "imgsz": imgsz, **software_versions(), "test": scored, "decision": "adopted as the first version",
        }  # fmt: skip
        write_card(lab_, 1, card)
        lab_.set_current(1)
        write_atomic(lab_.labelled_yaml, labelled_yaml_text(lab_, settings))
        lab_.incomplete.unlink()
    except BaseException:
        shutil.rmtree(lab_.root, ignore_errors=True)  # nothing half-made is left
        raise
    return InitSummary(lab_.root, "v1", test_images_n, test_cells, len(list_images(pool_dir)), scored["ci95"])


def _make_test_set(lab: Lab, names: dict[int, str], test_zip, test_images, test_data, split) -> tuple[int, int]:
    """Copy the test set into ``test/images/test`` and ``test/labels/test``; its dataset.yaml has empty train and
    val lists, so it cannot be trained on by mistake."""
    from cellseg_pl.cvat.convert import convert_coco_zip
    from cellseg_pl.data.dataset import load_dataset_yaml

    test = lab.root / "test"
    if test_zip is not None:
        staging = lab.root / ".test_convert"
        convert_coco_zip(test_zip, staging, images_dir=test_images)
        spec = load_dataset_yaml(staging / "dataset.yaml")
        sources = [*spec.splits.get("train", []), *spec.splits.get("val", [])]
        test_names = spec.names
    else:
        spec = load_dataset_yaml(test_data)
        sources = spec.splits.get(split, [])
        if not sources:
            raise LabError("--test-data", f"{test_data} has no '{split}' images", "pass --test-split")
        test_names = spec.names
    if test_names != names:
        raise LabError("--test-zip" if test_zip else "--test-data", f"its classes {test_names} are not the model's "
                       f"{names}", "label the test set with the model's classes")
    cells = 0
    for src in sources:
        rel = src.name
        dst = test / "images" / "test" / rel
        if dst.exists():
            raise LabError("--test-zip" if test_zip else "--test-data", f"two test images are named {rel}",
                           "rename one of them")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        label = label_path_for(src)
        (test / "labels" / "test").mkdir(parents=True, exist_ok=True)
        if label.is_file():
            text = label.read_text()
            cells += sum(1 for line in text.splitlines() if line.strip())
            shutil.copy2(label, test / "labels" / "test" / f"{Path(rel).stem}.txt")
    if test_zip is not None:
        shutil.rmtree(lab.root / ".test_convert")
    write_atomic(lab.test_data, "# the lab's fixed test set: scored every cycle, never trained on\n" + yaml.safe_dump(
        {"path": ".", "train": [], "val": [], "test": "images/test", "names": dict(names)}, sort_keys=False))
    return len(sources), cells
