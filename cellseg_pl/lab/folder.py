"""The lab folder: what it holds, and reading its hand-editable files with errors that name the file.

::

    <lab>/
      lab.yaml              the pool of unlabelled images, class names, the operating point, the promotion tolerance
      recipe.yaml           the fine-tuning recipe: a ``fit`` configuration (trainer, model and data settings)
      current               the deployed version, e.g. ``v3`` (a pointer: model files are never overwritten)
      models/vN.pt          Ultralytics .pt of each version; vN.json and vN.md: its model card
      test/                 the fixed test set (images/test, labels/test, dataset.yaml): never trained on
      labelled.yaml         every labelled set so far (train and val lists): what the next fine-tune trains on
      labels/cycleN/        cycle N's corrected labels, converted (convert's layout)
      cycles/cycleN/        cycle N: state.json, images/ for CVAT, predictions.json, overlays/, run/ (the fit)
      .incomplete           only while cycle init makes the folder (a folder a killed init left is made afresh)

Every file is written atomically (a kill leaves the old file or the new one).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellseg_pl.data.labels import label_path_for
from cellseg_pl.errors import CellSegError
from cellseg_pl.files import pid_alive, write_atomic


class LabError(CellSegError):
    """A lab folder, or an argument of a ``cycle`` command, that cannot be used."""


VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


@dataclass
class LabSettings:
    """``lab.yaml``."""

    pool: str
    """Folder of unlabelled images the cycles select from (sub-folders included)."""
    names: dict[int, str]
    """Class index -> name."""
    conf: float = 0.25
    """Operating point: the confidence at which F1 and counts are scored and predictions are made for CVAT."""
    min_area: float = 0.0
    """Detections smaller than this (px) are dropped from CVAT predictions (the guide's droplet rule: 500)."""
    tolerance: float = 0.005
    """A new model is not promoted when F1 or mask mAP50-95 on the test set falls by more than this."""
    labelled: list[str] = field(default_factory=list)
    """dataset.yaml files labelled before the first cycle (trained on, kept as they are)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    write_atomic(Path(path), json.dumps(data, indent=2, default=str) + "\n")


class Lab:
    """A lab folder (layout in the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------------ paths
    @property
    def settings_file(self) -> Path:
        return self.root / "lab.yaml"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def test_data(self) -> Path:
        return self.root / "test" / "dataset.yaml"

    @property
    def labelled_yaml(self) -> Path:
        return self.root / "labelled.yaml"

    def model(self, version: int) -> Path:
        return self.root / "models" / f"v{version}.pt"

    def card_file(self, version: int) -> Path:
        return self.root / "models" / f"v{version}.json"

    def cycle_dir(self, n: int) -> Path:
        return self.root / "cycles" / f"cycle{n}"

    def labels_dir(self, n: int) -> Path:
        return self.root / "labels" / f"cycle{n}"

    # ------------------------------------------------------------------ reading, with errors naming the file
    @property
    def incomplete(self) -> Path:
        """Present while ``cycle init`` makes the folder (it holds the process id)."""
        return self.root / ".incomplete"

    def half_made_by_a_dead_process(self) -> bool:
        try:
            pid = int(self.incomplete.read_text().strip())
        except (OSError, ValueError):
            return False
        return not pid_alive(pid)

    def check(self) -> None:
        if self.incomplete.exists():
            raise LabError("--lab", f"{self.root} is half-made: cycle init did not finish",
                           "run cycle init again with the same --lab (it starts afresh)")
        if not self.settings_file.is_file():
            raise LabError("--lab", f"{self.root} is not a lab folder (no lab.yaml)",
                           "create one with: python -m cellseg_pl cycle init --lab DIR --model MODEL.pt ...")

    def settings(self) -> LabSettings:
        self.check()
        try:
            raw = yaml.safe_load(self.settings_file.read_text())
        except yaml.YAMLError as e:
            raise LabError(str(self.settings_file), f"not valid YAML ({' '.join(str(e).split())})",
                           "fix the file by hand") from None
        if not isinstance(raw, dict) or "pool" not in raw or "names" not in raw:
            raise LabError(str(self.settings_file), "expected a mapping with 'pool' and 'names'", "fix the file by hand")
        try:
            settings = LabSettings(**{k: raw[k] for k in raw if k in LabSettings.__dataclass_fields__})
            settings.names = {int(k): str(v) for k, v in dict(settings.names).items()}
            settings.conf, settings.min_area = float(settings.conf), float(settings.min_area)
            settings.tolerance = float(settings.tolerance)
            settings.labelled = [str(p) for p in settings.labelled or []]
        except (TypeError, ValueError) as e:
            raise LabError(str(self.settings_file), f"a setting has the wrong type ({e})", "fix the file by hand") from None
        unknown = sorted(set(raw) - set(LabSettings.__dataclass_fields__))
        if unknown:
            raise LabError(str(self.settings_file), f"unknown setting(s) {', '.join(unknown)}",
                           f"known: {', '.join(LabSettings.__dataclass_fields__)}")
        if not 0 < settings.conf < 1:
            raise LabError(str(self.settings_file), f"conf {settings.conf} is not between 0 and 1", "e.g. 0.25")
        return settings

    def write_settings(self, settings: LabSettings) -> None:
        data = {k: getattr(settings, k) for k in LabSettings.__dataclass_fields__}
        write_atomic(self.settings_file, "# the lab's settings (cellseg_pl cycle); see docs/active-learning.md\n"
                     + yaml.safe_dump(data, sort_keys=False))

    def versions(self) -> list[int]:
        """Versions with a model file, in order."""
        found = []
        for p in (self.root / "models").glob("v*.pt"):
            m = VERSION_RE.match(p.stem)
            if m:
                found.append(int(m[1]))
        return sorted(found)

    def current(self) -> int:
        """The deployed version (``current``), checked: the pointer names a version whose model and card exist."""
        pointer = self.root / "current"
        if not pointer.is_file():
            raise LabError(str(pointer), "missing", "write the deployed version into it, e.g. v1")
        text = pointer.read_text().strip()
        m = VERSION_RE.match(text)
        if not m:
            raise LabError(str(pointer), f"{text[:40]!r} is not a version such as v2",
                           f"write one of {', '.join(f'v{v}' for v in self.versions()) or 'v1'} into it")
        version = int(m[1])
        if not self.model(version).is_file():
            raise LabError(str(pointer), f"names v{version}, but {self.model(version)} does not exist",
                           f"write one of {', '.join(f'v{v}' for v in self.versions())} into it")
        self.card(version)
        return version

    def set_current(self, version: int) -> None:
        write_atomic(self.root / "current", f"v{version}\n")

    def card(self, version: int) -> dict:
        """The model card of ``version``, checked."""
        path = self.card_file(version)
        try:
            card = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(str(path), "missing: every version has a model card", "restore it from a backup") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LabError(str(path), f"not valid JSON ({e})", "restore it, or fix it by hand") from None
        if not isinstance(card, dict) or card.get("version") != f"v{version}" or "sha256" not in card:
            raise LabError(str(path), f"not the card of v{version} (needs 'version': 'v{version}' and 'sha256')",
                           "restore it, or fix it by hand")
        return card

    def cycles(self) -> list[int]:
        found = []
        for p in (self.root / "cycles").glob("cycle*"):
            m = re.fullmatch(r"cycle([1-9][0-9]*)", p.name)
            if m and (p / "state.json").is_file():
                found.append(int(m[1]))
        return sorted(found)

    def state(self, n: int) -> dict:
        path = self.cycle_dir(n) / "state.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LabError(str(path), f"unreadable ({e})", "restore it, or remove the cycle's folder") from None
        if not isinstance(state, dict) or state.get("cycle") != n or "step" not in state:
            raise LabError(str(path), f"not the state of cycle {n}", "restore it, or remove the cycle's folder")
        return state

    def write_state(self, n: int, state: dict) -> None:
        write_json(self.cycle_dir(n) / "state.json", state)


def labelled_yaml_text(lab: Lab, settings: LabSettings) -> str:
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


def count_cells(data_yaml: Path) -> int:
    from cellseg_pl.data.dataset import load_dataset_yaml

    spec = load_dataset_yaml(data_yaml)
    total = 0
    for split in spec.splits.values():
        for p in split:
            label = label_path_for(p)
            if label.is_file():
                total += sum(1 for line in label.read_text().splitlines() if line.strip())
    return total


def labelled_sets(settings: LabSettings) -> list[dict]:
    """The data sets labelled before the lab (``lab.yaml``'s ``labelled``), as model cards list them."""
    from cellseg_pl.data.dataset import load_dataset_yaml

    out = []
    for path in settings.labelled:
        spec = load_dataset_yaml(path)
        out.append({"set": "labelled before the lab", "data": str(path), "train": len(spec.splits.get("train", [])),
                    "val": len(spec.splits.get("val", [])), "cells": count_cells(Path(path))})
    return out
