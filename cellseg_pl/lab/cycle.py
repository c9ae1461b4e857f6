"""The lab's cycle as commands: ``cycle init``, ``cycle next``, ``cycle learn``, ``cycle status``.

``cycle init`` (:mod:`cellseg_pl.lab.init`) makes the lab folder. Each cycle is then two commands, here:

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

import logging
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from cellseg_pl.data.images import list_images
from cellseg_pl.files import write_atomic
from cellseg_pl.infer.options import InferenceOptions
from cellseg_pl.lab.card import now, score_on_test, software_versions, ultralytics_figures, write_card
from cellseg_pl.lab.compare import RULE, not_worse, paired_bootstrap
from cellseg_pl.lab.folder import (Lab, LabError, LabSettings, count_cells, labelled_sets, labelled_yaml_text,
                                   sha256_of)

log = logging.getLogger(__name__)


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
                         "strategy": "random" if random else "uncertainty", "started": now()})
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
    corrected: str | None = None,
    force: bool = False,
    allow_empty: bool = False,
    device: str = InferenceOptions.device,
) -> LearnSummary:
    """Finish a cycle: convert the corrected CVAT export, fine-tune, score old and new, promote if not worse.

    Run it again after a kill: it continues from the last finished step. ``--force`` without ``--corrected``
    promotes the last cycle's fine-tune that was not promoted (while its parent is still the current version).

    Args:
        lab: the lab folder.
        corrected: the CVAT "COCO 1.0" export of this cycle's images, corrected.
        force: make the new model the next version even when it is worse (its card says so).
        allow_empty: accept an export without a single cell (all of the cycle's images are background).
        device: cpu, 0 (= cuda:0) or cuda:N, for scoring.
    """
    lab_ = Lab(lab)
    settings = lab_.settings()
    current = lab_.current()
    pending = [n for n in lab_.cycles() if lab_.state(n)["step"] != "done"]
    if corrected is None:
        if pending:
            raise LabError("--corrected", f"cycle {pending[0]} waits for CVAT's export of its images",
                           "pass the corrected 'COCO 1.0' zip")
        if force:
            return _force_last(lab_, settings, current, device)
        raise LabError("--corrected", "missing", "pass the corrected 'COCO 1.0' zip of the cycle")
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
        _convert(lab_, n, state, zip_path, allow_empty)
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
            records[name] = score_on_test(lab_, weights, settings, lab_.cycle_dir(n) / f"test_{name}", device,
                                          per_image=True)
        comparison = paired_bootstrap(records["old"]["per_image"], records["new"]["per_image"])
        promote, why = not_worse(comparison, settings.tolerance)
        state.update(comparison={k: d.as_dict() for k, d in comparison.items()}, promote=promote, reason=why)
        state["new_test"] = {k: v for k, v in records["new"].items() if k != "per_image"}
        state["step"] = "scored"
        lab_.write_state(n, state)
    new_version = None
    if state["promote"] or force:
        state["forced"] = bool(not state["promote"])
        new_version = _promote(lab_, n, state, settings, device)
        decision = (f"v{new_version} promoted: {state['reason']}" if state["promote"] else
                    f"v{new_version} FORCED with --force although {state['reason']}")
    else:
        decision = (f"the new model is not promoted ({state['reason']}); {state['model']} stays current; the "
                    f"labels are kept for the next cycle ({RULE})")
    state.update(step="done", decision=decision, finished=now(), version=f"v{new_version}" if new_version else None)
    lab_.write_state(n, state)
    return LearnSummary(lab_.root, n, state["model"], f"v{new_version}" if new_version else None, decision,
                        state["comparison"])


def _force_last(lab: Lab, settings: LabSettings, current: int, device: str) -> LearnSummary:
    """``cycle learn --force`` alone: the last cycle's fine-tune, not promoted, becomes the next version."""
    cycles = lab.cycles()
    n = cycles[-1] if cycles else None
    state = lab.state(n) if n else {}
    if not n or state.get("version") or "promote" not in state:
        raise LabError("--force", "the last cycle has no fine-tune that was refused",
                       "give --corrected with the next cycle's export, or --force with it")
    if state["model"] != f"v{current}":
        raise LabError("--force", f"cycle {n} fine-tuned {state['model']}, but v{current} is current now",
                       f"write {state['model']} into {lab.root / 'current'} first, if that is what you mean")
    state["forced"] = True
    version = _promote(lab, n, state, settings, device)
    decision = f"v{version} FORCED with --force although {state['reason']}"
    state.update(step="done", decision=decision, version=f"v{version}", finished=now())
    lab.write_state(n, state)
    return LearnSummary(lab.root, n, state["model"], f"v{version}", decision, state["comparison"])


def _convert(lab: Lab, n: int, state: dict, zip_path: Path, allow_empty: bool = False) -> None:
    """Convert the zip into labels/cycleN; its images must be this cycle's."""
    from cellseg_pl.cvat.convert import convert_coco_zip
    from cellseg_pl.data.dataset import load_dataset_yaml

    out = lab.labels_dir(n)
    if out.exists():
        shutil.rmtree(out)  # a conversion killed half-way: convert again
    convert_coco_zip(zip_path, out, images_dir=lab.cycle_dir(n) / "images", allow_empty=allow_empty)
    spec = load_dataset_yaml(out / "dataset.yaml")
    names = sorted(p.name for split in spec.splits.values() for p in split)
    ours = {Path(rel).name for rel in state["images"]}
    strangers = [name for name in names if name not in ours]
    if strangers:
        shutil.rmtree(out)
        raise LabError("--corrected", f"{zip_path.name} holds images that are not cycle {n}'s "
                       f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''})",
                       f"export the CVAT task made from {lab.cycle_dir(n) / 'images'}")
    names_of_lab = lab.settings().names
    if spec.names != names_of_lab:
        shutil.rmtree(out)
        raise LabError("--corrected", f"its classes {spec.names} are not the lab's {names_of_lab}",
                       "use the lab's labels in CVAT")
    state["labels"] = {"train": len(spec.splits.get("train", [])), "val": len(spec.splits.get("val", [])),
                       "cells": count_cells(out / "dataset.yaml")}


def _fine_tune(lab: Lab, n: int, state: dict) -> None:
    """Fine-tune the cycle's model on every label so far (resumes a killed fit from its last.ckpt)."""
    from cellseg_pl.__main__ import main

    settings = lab.settings()
    write_atomic(lab.labelled_yaml, labelled_yaml_text(lab, settings))
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
    # what this fine-tune trained on (labelled.yaml): the sets labelled before the lab and every converted cycle up
    # to this one, also those whose own model was not promoted; before them, what the adopted v1 was trained on
    cycles = []
    for m in lab.cycles():
        done = lab.state(m) if m != n else state
        if m <= n and "labels" in done:
            cycles.append({"set": f"cycle {m}", "labels": str(lab.labels_dir(m).relative_to(lab.root)),
                           "zip": done["zip"], "zip_sha256": done["zip_sha256"], **done["labels"]})
    adopted = [s for s in parent_card.get("trained_on", []) if "train" not in s]
    test = dict(state["new_test"])
    test["ultralytics"] = ultralytics_figures(lab, lab.model(version), settings, lab.cycle_dir(n) / "test_new",
                                               device, test["imgsz"])
    card = {
        "version": f"v{version}", "file": f"v{version}.pt", "sha256": sha256_of(lab.model(version)),
        "parent": f"v{parent}", "created": now(), "cycle": n,
        "trained_on": [*adopted, *labelled_sets(settings), *cycles],
        "all_labels": str(lab.labelled_yaml.relative_to(lab.root)),
        "command": state["command"], "config": str((lab.cycle_dir(n) / "run" / "config.yaml").relative_to(lab.root)),
        "imgsz": parent_card.get("imgsz"), **software_versions(), "test": test,
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
