#!/usr/bin/env python
"""Predict a folder of images and write COCO 1.0 JSON for CVAT (the lab's old script name).

Usage:
    python scripts/predict_simple_circles.py --model best.ckpt|best.pt --images DIR --output predictions.json \
        [--device cpu|0] [--conf 0.25] [--min-area 500] [--save-overlays DIR] [--tile auto|on|off] ...

Runs ``python -m cellseg_pl predict`` (:func:`cellseg_pl.infer.predict.predict_folder`; ``--help`` lists every flag).
"""

import os
import sys
from pathlib import Path

try:
    from cellseg_pl.__main__ import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cellseg_pl.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]], prog=os.path.basename(sys.argv[0])))
