#!/usr/bin/env python
"""Write a PNG grid of augmented training samples with their cell outlines: what the model sees in training.

Usage:
    python scripts/show_augment.py --config configs/demo.yaml [--n 8] [--epoch 0] [--output augment.png]

The samples come from the config's data module (``data:`` section: data set, ``imgsz`` and every augmentation
knob), through the same training transform as ``fit``. Augmentation randomness is a function of
(``seed_everything``, epoch, image index), so with the config's seed these are exactly the samples of that epoch
of a ``fit`` with this config; ``close_mosaic`` is applied for ``--epoch`` as in training. Outlines are drawn from
the instance masks the loss is given (one colour per class), with each box the loss is given in thin orange.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # offline: no version check when Albumentations is imported

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

try:
    from cellseg_pl.data.datamodule import CellSegDataModule
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cellseg_pl.data.datamodule import CellSegDataModule

#: BGR outline colour per class index (cycled).
COLOURS = ((80, 220, 60), (40, 40, 240), (240, 160, 30), (220, 60, 220), (30, 220, 240))


def draw_sample(sample: dict, scale: int) -> np.ndarray:
    """One augmented sample (the batch schema of :mod:`cellseg_pl.data.dataset`) -> BGR picture with outlines."""
    rgb = sample["img"].numpy().transpose(1, 2, 0)
    instances = sample["instances"].numpy()
    classes = sample["cls"].numpy().astype(int)
    picture = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale > 1:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    s = picture.shape[0]
    for k, cls in enumerate(classes):
        mask = (instances == k + 1).astype(np.uint8)
        if scale > 1:
            mask = cv2.resize(mask, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, COLOURS[cls % len(COLOURS)], 1)
        x, y, w, h = sample["bboxes"][k].tolist()
        top_left = (int((x - w / 2) * s), int((y - h / 2) * s))
        bottom_right = (int((x + w / 2) * s), int((y + h / 2) * s))
        cv2.rectangle(picture, top_left, bottom_right, (0, 170, 255), 1)
    label = f"{Path(sample['im_file']).stem}: {len(classes)}"
    cv2.putText(picture, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(picture, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return picture


def show_augment(config: Path, output: Path, n: int = 8, epoch: int = 0) -> Path:
    """Draw ``n`` augmented training samples of ``epoch`` from the data module of ``config`` into ``output``."""
    from lightning.pytorch import seed_everything

    cfg = yaml.safe_load(config.read_text()) or {}
    data = {k: v for k, v in (cfg.get("data") or {}).items()}
    data["num_workers"] = 0
    seed = cfg.get("seed_everything", 0)
    seed_everything(seed if isinstance(seed, int) and not isinstance(seed, bool) else 0, verbose=False)
    dm = CellSegDataModule(**data)
    max_epochs = int((cfg.get("trainer") or {}).get("max_epochs") or 100)
    dataset = dm.train_dataloader().dataset
    tiles = []
    for k in range(n):
        dm.set_epoch(epoch + k // len(dataset), max_epochs)  # past the last image: the next epoch's samples
        sample = dataset[k % len(dataset)]
        tiles.append(draw_sample(sample, scale=max(1, 256 // dm.hparams.imgsz)))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    side = tiles[0].shape[0]
    grid = np.full((rows * side + (rows - 1) * 4, cols * side + (cols - 1) * 4, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (side + 4): r * (side + 4) + side, c * (side + 4): c * (side + 4) + side] = tile
    output.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(output), grid):
        raise OSError(f"{output}: cannot write the PNG (check the folder and the .png suffix)")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, type=Path, help="a fit config, e.g. configs/demo.yaml")
    parser.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    parser.add_argument("--epoch", type=int, default=0, help="training epoch whose samples to show (0-based)")
    parser.add_argument("--output", type=Path, default=Path("augment.png"), help="PNG to write")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n: must be >= 1")
    if not args.config.is_file():
        print(f"error: --config: {args.config} does not exist", file=sys.stderr)
        return 2
    try:
        path = show_augment(args.config, args.output, args.n, args.epoch)
    except (ValueError, OSError, TypeError) as e:  # DatasetError is a ValueError; a bad data key a TypeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.n} augmented training samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
