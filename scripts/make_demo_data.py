"""Write the embedded demo data set (synthetic cells and droplets) to data/demo/ in the YOLO-seg layout.

    python scripts/make_demo_data.py [--root data/demo] [--train 64] [--val 16] [--size 256] [--seed 0]
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellseg_pl.data.demo import make_demo_dataset  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/demo", help="output folder")
    parser.add_argument("--train", type=int, default=64, help="number of training images")
    parser.add_argument("--val", type=int, default=16, help="number of validation images")
    parser.add_argument("--size", type=int, default=256, help="image side in px")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = make_demo_dataset(args.root, args.train, args.val, args.size, args.seed)
    print(f"demo data set: {path}")
