"""The lab's cycle as commands: ``cycle init``, ``cycle next``, ``cycle learn``, ``cycle status``.

``cycle init`` makes a lab folder (:mod:`cellseg_pl.lab.folder`): it adopts the lab's model as v1, sets the fixed test
set aside and writes the fine-tuning recipe. Each cycle is then two commands:

* ``cycle next --k N``: the N pool images the current model is least sure of (``select``'s ranking; ``--random``
  for random picks), never an image of an earlier cycle or of the test set, copied into ``cycles/cycleN/images``
  with the model's predictions for CVAT (``predictions.json``) and overlays;
* ``cycle learn --corrected ZIP``: converts CVAT's export, adds it to every label so far, fine-tunes the current
  model with the recipe, scores the old and the new model on the test set with the one evaluator (a paired
  bootstrap over the test images), and makes the new model the next version only when it is not worse
  (:data:`cellseg_pl.lab.compare.RULE`; ``--force`` anyway, and its card says so). Each step is recorded in
  ``cycles/cycleN/state.json`` when it is done: run again after a kill, it continues where it stopped.
"""

from __future__ import annotations

import datetime
import logging
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import yaml

from cellseg_pl.data.images import list_images
from cellseg_pl.data.labels import label_path_for
from cellseg_pl.files import write_atomic
from cellseg_pl.infer.options import InferenceOptions
from cellseg_pl.lab.compare import RULE, bootstrap_ci, not_worse, paired_bootstrap
from cellseg_pl.lab.folder import Lab, LabError, LabSettings, sha256_of, write_json

log = logging.getLogger(__name__)

#: The fine-tuning recipe ``cycle init`` writes (``recipe.yaml``, a ``fit`` configuration the lab may edit).
#: AdamW at the guide's lr0 0.0005, with the bias warmup starting there too: in the active-learning benchmark the
#: guide's ``optimizer auto`` (lr0 ignored, AdamW at 0.002) threw a good model off for several epochs and the default
#: bias warmup (0.1) cost the first fine-tune F1 (docs/active-learning.md).
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


# ---------------------------------------------------------------------------------------------------------- init
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
        test_images_n, test_cells = _make_test_set(lab_, names, test_zip, test_images, test_data, test_split)
        export_model(model, lab_.model(1))
        settings = LabSettings(pool=str(pool_dir), names=dict(names), conf=conf, min_area=min_area,
                               labelled=[str(Path(p).expanduser().resolve()) for p in labelled or []])
        lab_.write_settings(settings)
        write_atomic(lab_.recipe, RECIPE.format(epochs=epochs, min_area=min_area, imgsz=imgsz, batch_size=batch_size,
                                                patience=patience))
        scored = _score(lab_, lab_.model(1), settings, lab_.root / "models" / "v1_test", device)
        card = {
            "version": "v1", "file": "v1.pt", "sha256": sha256_of(lab_.model(1)), "parent": None,
            "created": _now(), "adopted_from": str(Path(model).expanduser().resolve()),
            "trained_on": [{"set": "before the lab (adopted)", "data": str(info.get("data") or "unknown")}],
            "cycle": 0, "imgsz": imgsz, **_versions(), "test": scored, "decision": "adopted as the first version",
        }  # fmt: skip
        write_card(lab_, 1, card)
        lab_.set_current(1)
        write_atomic(lab_.labelled_yaml, _labelled_yaml(lab_, settings))
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


# ---------------------------------------------------------------------------------------------------------- next
@dataclass
class NextSummary:
    lab: Path
    cycle: int
    model: str
    images: list[str]
    strategy: str
    left: int

    def format(self) -> str:
        d = self.lab / "cycles" / f"cycle{self.cycle}"
        return "\n".join([
            f"cycle {self.cycle}: {len(self.images)} images picked by {self.strategy} with {self.model} "
            f"({self.left} unlabelled pool images left after them)",
            f"  images:      {d / 'images'}",
            f"  predictions: {d / 'predictions.json'}   overlays: {d / 'overlays'}",
            "in CVAT: create a task from the images; Actions > Upload annotations > 'COCO 1.0' > predictions.json;",
            "correct it (delete droplets and false cells, add missed cells, fix outlines); Actions > Export task",
            "dataset > 'COCO 1.0' (with or without images). Then:",
            f"  python -m cellseg_pl cycle learn --lab {self.lab} --corrected <the exported zip>",
        ])  # fmt: skip


def cycle_next(
    lab: str,
    k: int = 200,
    random: bool = False,
    seed: int = 0,
    tta: bool = True,
    device: str = InferenceOptions.device,
    batch_size: int = InferenceOptions.batch_size,
) -> NextSummary:
    """Start a cycle: pick k unlabelled pool images for CVAT, with the current model's predictions.

    Args:
        lab: the lab folder.
        k: how many images to label in this cycle.
        random: pick at random (seeded) instead of the images the model is least sure of.
        seed: seed of the random pick.
        tta: also score flipped images in the uncertainty ranking (select's --tta).
        device: cpu, 0 (= cuda:0) or cuda:N.
        batch_size: images per forward pass.
    """
    from cellseg_pl.infer.predict import predict_folder
    from cellseg_pl.infer.select import select_images

    lab_ = Lab(lab)
    settings = lab_.settings()
    current = lab_.current()
    cycles = lab_.cycles()
    for n in cycles:
        state = lab_.state(n)
        if state["step"] != "done":
            raise LabError("cycle next", f"cycle {n} still waits for its corrections (step: {state['step']})",
                           f"run: python -m cellseg_pl cycle learn --lab {lab_.root} --corrected <zip>")
    if k < 1:
        raise LabError("--k", f"{k} is not a positive number", "pass how many images to label, e.g. 200")
    n = (cycles[-1] if cycles else 0) + 1
    pool = Path(settings.pool)
    if not pool.is_dir():
        raise LabError(str(lab_.settings_file), f"pool {pool} does not exist", "fix 'pool' in the file")
    rels = [p.relative_to(pool).as_posix() for p in list_images(pool)]
    taken = {rel for m in cycles for rel in lab_.state(m)["images"]}
    in_test = _same_as_test(lab_, pool, rels)
    left = [rel for rel in rels if rel not in taken and rel not in in_test]
    if not left:
        raise LabError("--k", f"the pool {pool} has no image left that is not labelled or in the test set "
                       f"({len(rels)} images, {len(taken)} labelled, {len(in_test)} in the test set)",
                       "add images to the pool")
    cycle = lab_.cycle_dir(n)
    if cycle.exists():
        shutil.rmtree(cycle)  # a cycle next killed before its state was written: start it again
    cycle.mkdir(parents=True)
    excluded = cycle / "excluded.txt"
    write_atomic(excluded, "".join(f"{rel}\n" for rel in sorted(set(rels) - set(left))))
    model = lab_.model(current)
    options = {"conf": settings.conf, "min_area": settings.min_area, "device": device, "batch_size": batch_size}
    if random:
        picked = sorted(Random(seed * 1000 + n).sample(left, min(k, len(left))))
        for rel in picked:
            (cycle / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pool / rel, cycle / "images" / rel)
        write_atomic(cycle / "next_batch.txt", "".join(f"{rel}\n" for rel in picked))
    else:
        summary = select_images(model, pool, k=min(k, len(left)), output=cycle / "next_batch.txt",
                                copy_to=cycle / "images", tta=tta, exclude=[str(excluded)], **options)
        picked = list(summary.selected)
    predict_folder(model, cycle / "images", cycle / "predictions.json", save_overlays=cycle / "overlays", **options)
    lab_.write_state(n, {"cycle": n, "step": "labelling", "model": f"v{current}", "images": picked,
                         "strategy": "random" if random else "uncertainty", "started": _now()})
    return NextSummary(lab_.root, n, f"v{current}", picked, "random" if random else "uncertainty",
                       len(left) - len(picked))


def _same_as_test(lab: Lab, pool: Path, rels: list[str]) -> set[str]:
    """Pool images whose content is a test image's (compared by size, then SHA-256)."""
    test = {}
    for p in list_images(lab.root / "test" / "images"):
        test.setdefault(p.stat().st_size, set()).add(sha256_of(p))
    same = set()
    for rel in rels:
        size = (pool / rel).stat().st_size
        if size in test and sha256_of(pool / rel) in test[size]:
            same.add(rel)
    return same


# ---------------------------------------------------------------------------------------------------------- learn
@dataclass
class LearnSummary:
    lab: Path
    cycle: int
    old: str
    new: str | None
    decision: str
    comparison: dict = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"cycle {self.cycle}: {self.decision}"]
        for k, d in self.comparison.items():
            lines.append(f"  {k:<10} {self.old} {d['old']:.3f} -> new {d['new']:.3f} ({d['difference']:+.3f}, 95 % "
                         f"interval {d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f})")
        lines.append(f"current model: {self.new or self.old} ({self.lab / 'models'})")
        return "\n".join(lines)


def cycle_learn(
    lab: str,
    corrected: str,
    force: bool = False,
    device: str = InferenceOptions.device,
) -> LearnSummary:
    """Finish a cycle: convert the corrected CVAT export, fine-tune, score old and new, promote if not worse.

    Run it again after a kill: it continues from the last finished step.

    Args:
        lab: the lab folder.
        corrected: the CVAT "COCO 1.0" export of this cycle's images, corrected.
        force: make the new model the next version even when it is worse (its card says so).
        device: cpu, 0 (= cuda:0) or cuda:N, for scoring.
    """
    lab_ = Lab(lab)
    settings = lab_.settings()
    lab_.current()
    pending = [n for n in lab_.cycles() if lab_.state(n)["step"] != "done"]
    if not pending:
        raise LabError("cycle learn", "no cycle waits for corrections",
                       f"start one with: python -m cellseg_pl cycle next --lab {lab_.root} --k 200")
    n = pending[0]
    state = lab_.state(n)
    zip_path = Path(corrected).expanduser().resolve()
    if not zip_path.is_file():
        raise LabError("--corrected", f"{zip_path} does not exist", "pass CVAT's 'COCO 1.0' export of this cycle")
    digest = sha256_of(zip_path)
    for m in lab_.cycles():
        if m != n and lab_.state(m).get("zip_sha256") == digest:
            raise LabError("--corrected", f"{zip_path} is cycle {m}'s export, given again",
                           f"export cycle {n}'s task from CVAT ({len(state['images'])} images)")
    if state.get("zip_sha256", digest) != digest:
        raise LabError("--corrected", f"cycle {n} was started with another zip ({state['zip']})",
                       "give the same file to continue it")
    state.update(zip=str(zip_path), zip_sha256=digest)
    steps = ("labelling", "converted", "trained", "scored", "promoting", "done")

    def at_least(step: str) -> bool:
        return steps.index(state["step"]) >= steps.index(step)

    if not at_least("converted"):
        _convert(lab_, n, state, zip_path)
        state["step"] = "converted"
        lab_.write_state(n, state)
    if not at_least("trained"):
        _fine_tune(lab_, n, state)
        state["step"] = "trained"
        lab_.write_state(n, state)
    if not at_least("scored"):
        old = lab_.model(int(state["model"][1:]))
        new = lab_.cycle_dir(n) / "run" / "weights" / "best.ckpt"
        records = {}
        for name, weights in (("old", old), ("new", new)):
            records[name] = _score(lab_, weights, settings, lab_.cycle_dir(n) / f"test_{name}", device, per_image=True)
        comparison = paired_bootstrap(records["old"]["per_image"], records["new"]["per_image"])
        promote, why = not_worse(comparison, settings.tolerance)
        state.update(comparison={k: d.as_dict() for k, d in comparison.items()}, promote=promote, reason=why,
                     forced=bool(force and not promote))
        state["new_test"] = {k: v for k, v in records["new"].items() if k != "per_image"}
        state["step"] = "scored"
        lab_.write_state(n, state)
    new_version = None
    if state["promote"] or force:
        state["forced"] = bool(not state["promote"])
        new_version = _promote(lab_, n, state, settings, device)
        decision = (f"v{new_version} {'promoted' if state['promote'] else 'FORCED (worse: ' + state['reason'] + ')'}; "
                    f"{state['reason'] if state['promote'] else ''}").rstrip("; ")
    else:
        decision = (f"the new model is not promoted ({state['reason']}); {state['model']} stays current; the "
                    f"labels are kept for the next cycle ({RULE})")
    state.update(step="done", decision=decision, finished=_now(), version=f"v{new_version}" if new_version else None)
    lab_.write_state(n, state)
    return LearnSummary(lab_.root, n, state["model"], f"v{new_version}" if new_version else None, decision,
                        state["comparison"])


def _convert(lab: Lab, n: int, state: dict, zip_path: Path) -> None:
    """Convert the zip into labels/cycleN; its images must be this cycle's."""
    from cellseg_pl.cvat.convert import convert_coco_zip
    from cellseg_pl.data.dataset import load_dataset_yaml

    out = lab.labels_dir(n)
    if out.exists():
        shutil.rmtree(out)  # a conversion killed half-way: convert again
    convert_coco_zip(zip_path, out, images_dir=lab.cycle_dir(n) / "images")
    spec = load_dataset_yaml(out / "dataset.yaml")
    names = sorted(p.name for split in spec.splits.values() for p in split)
    ours = {Path(rel).name for rel in state["images"]}
    strangers = [name for name in names if name not in ours]
    if strangers:
        shutil.rmtree(out)
        raise LabError("--corrected", f"{zip_path.name} holds images that are not cycle {n}'s "
                       f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''})",
                       f"export the CVAT task made from {lab.cycle_dir(n) / 'images'}")
    if spec.names != Lab(lab.root).settings().names:
        shutil.rmtree(out)
        raise LabError("--corrected", f"its classes {spec.names} are not the lab's {lab.settings().names}",
                       "use the lab's labels in CVAT")
    state["labels"] = {"train": len(spec.splits.get("train", [])), "val": len(spec.splits.get("val", [])),
                       "cells": _cells(out / "dataset.yaml")}


def _fine_tune(lab: Lab, n: int, state: dict) -> None:
    """Fine-tune the cycle's model on every label so far (resumes a killed fit from its last.ckpt)."""
    from cellseg_pl.__main__ import main

    settings = lab.settings()
    write_atomic(lab.labelled_yaml, _labelled_yaml(lab, settings))
    _check_no_test_image_in(lab)
    run = lab.cycle_dir(n) / "run"
    args = ["fit", "--config", str(lab.recipe), "--model.model", str(lab.model(int(state["model"][1:]))),
            "--data.dataset", str(lab.labelled_yaml), "--project", str(lab.cycle_dir(n)), "--name", "run"]
    state["command"] = "python -m cellseg_pl " + shlex.join(args)
    if (run / "weights" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]  # a killed fine-tune continues
    elif run.exists():
        shutil.rmtree(run)  # killed before its first checkpoint
    code = main(args)
    if code != 0 or not (run / "weights" / "best.ckpt").is_file():
        raise LabError("cycle learn", f"the fine-tune of cycle {n} failed (exit code {code}; see above)",
                       f"fix {lab.recipe} or the data, then run cycle learn again")


def _check_no_test_image_in(lab: Lab) -> None:
    from cellseg_pl.data.dataset import load_dataset_yaml

    spec = load_dataset_yaml(lab.labelled_yaml)
    test = {sha256_of(p) for p in list_images(lab.root / "test" / "images")}
    for split in ("train", "val"):
        for p in spec.splits.get(split, []):
            if sha256_of(p) in test:
                raise LabError(str(p), "is a test image, in the labelled data",
                               "remove it from the labelled data: the test set must never be trained on")


def _promote(lab: Lab, n: int, state: dict, settings: LabSettings, device: str) -> int:
    from cellseg_pl.train.export import export_model

    version = state.get("promoting") or (max(lab.versions()) + 1)
    state["promoting"] = version
    state["step"] = "promoting"
    lab.write_state(n, state)
    if not lab.model(version).is_file():
        export_model(lab.cycle_dir(n) / "run" / "weights" / "best.ckpt", lab.model(version))
    parent = int(state["model"][1:])
    parent_card = lab.card(parent)
    test = dict(state["new_test"])
    test["ultralytics"] = _ultralytics_figures(lab, lab.model(version), settings, lab.cycle_dir(n) / "test_new",
                                               device, test["imgsz"])
    card = {
        "version": f"v{version}", "file": f"v{version}.pt", "sha256": sha256_of(lab.model(version)),
        "parent": f"v{parent}", "created": _now(), "cycle": n,
        "trained_on": [*parent_card.get("trained_on", []), {
            "set": f"cycle {n}", "labels": str(lab.labels_dir(n).relative_to(lab.root)), "zip": state["zip"],
            "zip_sha256": state["zip_sha256"], **state["labels"]}],
        "all_labels": str(lab.labelled_yaml.relative_to(lab.root)),
        "command": state["command"], "config": str((lab.cycle_dir(n) / "run" / "config.yaml").relative_to(lab.root)),
        "imgsz": parent_card.get("imgsz"), **_versions(), "test": test,
        "vs_parent": state["comparison"], "rule": RULE,
        "decision": "promoted" if state["promote"] else f"FORCED with --force although {state['reason']}",
    }  # fmt: skip
    write_card(lab, version, card)
    lab.set_current(version)
    return version


# ---------------------------------------------------------------------------------------------------------- status
@dataclass
class StatusSummary:
    lab: Path
    rows: list[dict]
    current: int
    pending: list[str]

    def format(self) -> str:
        lines = [f"lab {self.lab}", "", "| version | parent | cycle | labels (train/val images, cells) | test F1 [95 %] | "
                 "test mask mAP50-95 [95 %] | mAP50 (yolo val) | decision |", "|---" * 8 + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(str(r[k]) for k in ("version", "parent", "cycle", "labels", "F1", "mAP",
                                                                 "yolo", "decision")) + " |")
        lines += ["", f"current: v{self.current}", *self.pending]
        return "\n".join(lines)


def cycle_status(lab: str) -> StatusSummary:
    """The versions of a lab: parent, labels used, test metrics with 95 % intervals, and the pending cycle.

    Args:
        lab: the lab folder.
    """
    lab_ = Lab(lab)
    lab_.settings()
    current = lab_.current()
    rows = []
    for v in lab_.versions():
        card = lab_.card(v)
        ci = card["test"]["ci95"]
        sets = [s for s in card.get("trained_on", []) if "train" in s]
        labels = (f"{sum(s['train'] for s in sets)}/{sum(s['val'] for s in sets)}, {sum(s['cells'] for s in sets)}"
                  if sets else "-")
        rows.append({
            "version": f"v{v}" + (" (current)" if v == current else ""), "parent": card.get("parent") or "-",
            "cycle": card.get("cycle", "-"), "labels": labels,
            "F1": f"{ci['F1'][0]:.3f} [{ci['F1'][1]:.3f}, {ci['F1'][2]:.3f}]",
            "mAP": f"{ci['mAP50-95'][0]:.3f} [{ci['mAP50-95'][1]:.3f}, {ci['mAP50-95'][2]:.3f}]",
            "yolo": f"{card['test']['ultralytics']['mAP50(M)']:.3f}" if card["test"].get("ultralytics") else "-",
            "decision": card.get("decision", "-"),
        })  # fmt: skip
    pending = []
    for n in lab_.cycles():
        state = lab_.state(n)
        if state["step"] != "done":
            pending.append(f"cycle {n}: {state['step']} ({len(state['images'])} images from {state['model']})")
        elif not state.get("version"):
            pending.append(f"cycle {n}: labels kept, model not promoted ({state.get('reason', '')})")
    return StatusSummary(lab_.root, rows, current, pending)


# ---------------------------------------------------------------------------------------------------------- helpers
def _score(lab: Lab, weights: Path, settings: LabSettings, folder: Path, device: str, per_image: bool = False) -> dict:
    """The one evaluator on the test set, 95 % intervals, and Ultralytics' own val of a .pt (its mAP50)."""
    from cellseg_pl.evaluate import evaluate

    result = evaluate(weights, lab.test_data, split="test", conf=settings.conf, device=device, per_image=True)
    out = {k: result[k] for k in ("mAP50(M)", "mAP50-95(M)", "F1@0.5", "P@0.5", "R@0.5", "count_MAE", "images",
                                  "imgsz")}
    out["conf"] = settings.conf
    out["ci95"] = bootstrap_ci(result["per_image"])
    if Path(weights).suffix == ".pt":
        out["ultralytics"] = _ultralytics_figures(lab, weights, settings, folder, device, result["imgsz"])
    if per_image:
        out["per_image"] = result["per_image"]
    return out


def _ultralytics_figures(lab: Lab, pt: Path, settings: LabSettings, folder: Path, device: str, imgsz: int) -> dict:
    """``yolo segment val``'s figures of a .pt on the test set (the numbers of the lab's history)."""
    from cellseg_pl.yolo.val import ultralytics_val

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "ultralytics_test.yaml"  # (Ultralytics wants train and val keys: a file of its own, removed)
    write_atomic(data, yaml.safe_dump({"path": str(lab.root / "test"), "train": "images/test", "val": "images/test",
                                       "names": settings.names}))
    try:
        return ultralytics_val(pt, data, imgsz, folder, device="cpu" if str(device) == "cpu" else
                               str(device).replace("cuda:", ""))
    finally:
        data.unlink(missing_ok=True)


def _labelled_yaml(lab: Lab, settings: LabSettings) -> str:
    """Every labelled set so far: the ones before the lab, then each converted cycle, in order (val keeps its first
    images and grows)."""
    from cellseg_pl.data.dataset import load_dataset_yaml

    train, val = [], []
    for path in settings.labelled:  # their own train/val entries, made absolute
        spec = load_dataset_yaml(path)
        raw = yaml.safe_load(Path(path).read_text())
        for key, out in (("train", train), ("val", val)):
            entries = raw.get(key) or []
            for entry in entries if isinstance(entries, list) else [entries]:
                out.append(str(Path(entry) if Path(str(entry)).is_absolute() else spec.root / str(entry)))
    for n in lab.cycles():
        for key, out in (("train", train), ("val", val)):
            folder = lab.labels_dir(n) / "images" / key
            if (lab.labels_dir(n) / "dataset.yaml").is_file() and folder.is_dir():
                out.append(str(folder))
    return ("# every label so far (written by cycle learn): what the next fine-tune trains on\n"
            + yaml.safe_dump({"path": str(lab.root), "train": train, "val": val, "names": settings.names},
                             sort_keys=False))


def _cells(data_yaml: Path) -> int:
    from cellseg_pl.data.dataset import load_dataset_yaml

    spec = load_dataset_yaml(data_yaml)
    total = 0
    for split in spec.splits.values():
        for p in split:
            label = label_path_for(p)
            if label.is_file():
                total += sum(1 for line in label.read_text().splitlines() if line.strip())
    return total


def _versions() -> dict[str, str]:
    import cellseg_pl
    from cellseg_pl.yolo.network import ultralytics_version

    return {"cellseg_pl": cellseg_pl.__version__, "ultralytics": ultralytics_version(),
            "python": sys.version.split()[0]}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_card(lab: Lab, version: int, card: dict) -> None:
    """``models/vN.json`` and a short ``models/vN.md`` for people."""
    write_json(lab.card_file(version), card)
    t = card["test"]
    ci = t["ci95"]
    lines = [
        f"# Model v{version}", "",
        f"- file: `{card['file']}` (sha256 `{card['sha256'][:16]}...`), created {card['created']}",
        f"- parent: {card.get('parent') or 'none (adopted: ' + str(card.get('adopted_from')) + ')'}",
        f"- decision: {card['decision']}",
        f"- test set ({t['images']} images, conf {t['conf']}): F1 {ci['F1'][0]:.3f} [{ci['F1'][1]:.3f}, "
        f"{ci['F1'][2]:.3f}], mask mAP50-95 {ci['mAP50-95'][0]:.3f} [{ci['mAP50-95'][1]:.3f}, "
        f"{ci['mAP50-95'][2]:.3f}] (COCO, full resolution), mask mAP50 {t['mAP50(M)']:.3f}, counting error "
        f"{t['count_MAE']:.2f} cells per image",
    ]  # fmt: skip
    if t.get("ultralytics"):
        lines.append(f"- `yolo segment val` on the test set: mask mAP50 {t['ultralytics']['mAP50(M)']:.3f}, mask "
                     f"mAP50-95 {t['ultralytics']['mAP50-95(M)']:.3f} (masks at 1/4 resolution, Ultralytics' numbers)")
    for s in card.get("trained_on", []):
        lines.append(f"- trained on: {s['set']}" + (f", {s['train']} train / {s['val']} val images, {s['cells']} cells, "
                                                  f"zip sha256 `{s['zip_sha256'][:16]}...`" if "train" in s else ""))
    if card.get("command"):
        lines.append(f"- command: `{card['command']}`")
    write_atomic(lab.root / "models" / f"v{version}.md", "\n".join(lines) + "\n")
