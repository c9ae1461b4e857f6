"""How long the lab waits before a command answers: every command's ``--help`` and ``convert`` of the demo data's
CVAT export, each alternated with ``yolo help`` (Ultralytics' own start-up), median of ``--runs``.

    python -m benchmarks.startup [--runs 5] [--out checkpoints/bench_startup]

Rows:

* ``<command> --help``: as a user sees it after the first time (``cellseg_pl.help_cache`` keeps the text; one
  warm-up run fills it);
* ``<command> --help (cold)``: generated afresh every time (``CELLSEG_PL_NO_HELP_CACHE=1``): the first call after
  an install or an edit of the code;
* ``convert``: the demo data (``data/demo``, written by ``scripts/make_demo_data.py`` if missing) zipped as CVAT's
  "COCO 1.0" export, converted into a new folder each run.

Each row runs the pair (ours, ``yolo help``) in turn, after one warm-up of each, and reports both medians and the
median of the per-pair ratios. Wall time of the whole process, 2 CPU cores; not part of CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO

COMMANDS = ("fit", "validate", "test", "predict", "convert", "export", "select", "evaluate", "cycle init",
            "cycle next", "cycle learn", "cycle status")
COLD = ("fit", "predict")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return wall


def pair(ours: list[str], theirs: list[str], runs: int, env: dict[str, str], before=None) -> dict:
    """``ours`` and ``theirs`` in turn, one warm-up each, then ``runs`` pairs; ``before`` runs before each of ours."""
    a, b = [], []
    for i in range(runs + 1):
        if before:
            before()
        ta = timed(ours, env)
        tb = timed(theirs, env)
        if i:  # the first pair is the warm-up
            a.append(ta)
            b.append(tb)
    return {"ours": statistics.median(a), "yolo": statistics.median(b),
            "ratio": statistics.median(x / y for x, y in zip(a, b))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="counted pairs per row (after one warm-up)")
    p.add_argument("--out", default=str(REPO / "checkpoints" / "bench_startup"), help="scratch folder")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(out / "cache")}  # a help cache of its own, filled by the warm-up
    env.pop("CELLSEG_PL_NO_HELP_CACHE", None)
    cold_env = {**env, "CELLSEG_PL_NO_HELP_CACHE": "1"}
    yolo = [str(Path(sys.executable).with_name("yolo")), "help"]
    python = [sys.executable, "-m", "cellseg_pl"]

    from benchmarks.active_learning import true_labels_zip

    if not (REPO / "data" / "demo" / "dataset.yaml").is_file():
        subprocess.run([sys.executable, "scripts/make_demo_data.py"], cwd=REPO, check=True)
    images = REPO / "data" / "demo" / "images" / "train"
    export = true_labels_zip(sorted(images.iterdir()), {0: "cell"}, out / "demo_export.zip")
    converted = out / "converted"

    rows = []
    for command in COMMANDS:
        rows.append((f"{command} --help", pair([*python, *command.split(), "--help"], yolo, a.runs, env)))
        if command in COLD:
            rows.append((f"{command} --help (cold)", pair([*python, *command.split(), "--help"], yolo, a.runs,
                                                          cold_env)))
    rows.append((f"convert ({len(list(images.iterdir()))} demo images)",
                 pair([*python, "convert", "--coco-zip", str(export), "--images-dir", str(images), "--output-dir",
                       str(converted)], yolo, a.runs, env, before=lambda: shutil.rmtree(converted, ignore_errors=True))))
    print(f"| command | ours (s, median of {a.runs}) | yolo help (s) | ratio ours / yolo help |")
    print("|---|---|---|---|")
    for name, r in rows:
        print(f"| `{name}` | {r['ours']:.2f} | {r['yolo']:.2f} | {r['ratio']:.2f} |")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
