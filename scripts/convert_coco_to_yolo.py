#!/usr/bin/env python
"""Convert a CVAT "COCO 1.0" export into a YOLO-seg dataset folder (the lab's old script name).

Usage:
    python scripts/convert_coco_to_yolo.py --coco-zip annotations.zip \
        [--images-dir images/subset_200] --output-dir training_data/subset_200 \
        [--val-fraction 0.2] [--seed 0] [--overwrite]

Runs ``python -m cellseg_pl convert`` (:func:`cellseg_pl.cvat.convert.convert_coco_zip`; ``--help`` lists every flag).
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
    sys.exit(main(["convert", *sys.argv[1:]], prog=os.path.basename(sys.argv[0])))
