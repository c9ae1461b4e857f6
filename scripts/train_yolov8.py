#!/usr/bin/env python
"""The guide's ``yolo segment train ...`` command, run on cellseg_pl: change the word ``yolo`` only.

Usage:
    python scripts/train_yolov8.py segment train data=.../dataset.yaml model=.../yolov8s_cells_v1.0.pt \
        epochs=100 imgsz=640 batch=8 device=0 project=... name=... patience=20 lr0=0.0005 degrees=180.0 ...

Each ``key=value`` becomes a ``python -m cellseg_pl fit`` option (the table is in :mod:`cellseg_pl.train.yolo_args` and in
README.md, "Coming from yolo segment train"); an unknown or malformed argument stops with an error naming it.
All work happens in :func:`cellseg_pl.train.yolo_args.main`.
"""

import sys
from pathlib import Path

try:
    from cellseg_pl.train.yolo_args import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cellseg_pl.train.yolo_args import main

if __name__ == "__main__":
    sys.exit(main())
