"""Importing does nothing: ``import cellseg_pl`` and every module in it leave the process as they found it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Run in a fresh interpreter: the libraries cellseg_pl builds on are imported first (what they do on import is
#: theirs), then the state is taken, then cellseg_pl and each of its modules (``__main__`` aside: running it is the
#: command line) are imported, and the state is taken again.
PROBE = r"""
import importlib, json, logging, os, pkgutil, sys, threading

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # (the libraries' own import, without its PyPI check)
import albumentations, cv2, jsonargparse, lightning.pytorch, numpy, torch, torchmetrics  # noqa: E401
del os.environ["NO_ALBUMENTATIONS_UPDATE"]


def state():
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]
    return {"env": dict(os.environ), "threads": sorted(t.name for t in threading.enumerate()),
            "handlers": {l.name: [repr(h) for h in l.handlers] for l in loggers if l.handlers},
            "levels": {l.name: l.level for l in loggers if l.name.startswith("cellseg_pl") or l is logging.getLogger()}}


before = state()
import cellseg_pl

names = [m.name for m in pkgutil.walk_packages(cellseg_pl.__path__, "cellseg_pl.") if m.name != "cellseg_pl.__main__"]
for name in names:
    importlib.import_module(name)
after = state()
print(json.dumps({"before": before, "after": after, "modules": names, "ultralytics": "ultralytics" in sys.modules}))
"""


def test_importing_cellseg_pl_changes_no_environment_handler_or_thread():
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("NO_ALBUMENTATIONS_UPDATE", "YOLO_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = seen["before"], seen["after"]
    assert len(seen["modules"]) >= 30 and "cellseg_pl.train.module" in seen["modules"]
    changed = {k for k in set(before["env"]) | set(after["env"]) if before["env"].get(k) != after["env"].get(k)}
    assert not changed, f"importing cellseg_pl changed the environment: {sorted(changed)}"
    assert after["threads"] == before["threads"]
    new_handlers = {k: v for k, v in after["handlers"].items() if before["handlers"].get(k) != v}
    assert not any(k == "root" or k.startswith("cellseg_pl") for k in new_handlers), new_handlers
    assert {k: v for k, v in after["levels"].items() if k in before["levels"] or v} == before["levels"]  # (NOTSET)
    assert not seen["ultralytics"], "importing cellseg_pl imports Ultralytics (it is loaded when a model is built)"
