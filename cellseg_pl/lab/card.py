"""A version's model card, and the test-set figures it carries: the one evaluator with 95 % intervals, and
``yolo segment val``'s own figures of the ``.pt``."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import yaml

from cellseg_pl.files import write_atomic
from cellseg_pl.lab.compare import bootstrap_ci
from cellseg_pl.lab.folder import Lab, LabSettings, write_json


def score_on_test(lab: Lab, weights: Path, settings: LabSettings, folder: Path, device: str,
                  per_image: bool = False) -> dict:
    """The one evaluator on the test set, 95 % intervals, and Ultralytics' own val of a .pt (its mAP50)."""
    from cellseg_pl.evaluate import evaluate

    result = evaluate(weights, lab.test_data, split="test", conf=settings.conf, device=device, per_image=True)
    out = {k: result[k] for k in ("mAP50(M)", "mAP50-95(M)", "F1@0.5", "P@0.5", "R@0.5", "count_MAE", "images",
                                  "imgsz")}
    out["conf"] = settings.conf
    out["ci95"] = bootstrap_ci(result["per_image"])
    if Path(weights).suffix == ".pt":
        out["ultralytics"] = ultralytics_figures(lab, weights, settings, folder, device, result["imgsz"])
    if per_image:
        out["per_image"] = result["per_image"]
    return out


def ultralytics_figures(lab: Lab, pt: Path, settings: LabSettings, folder: Path, device: str, imgsz: int) -> dict:
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


def software_versions() -> dict[str, str]:
    import cellseg_pl
    from cellseg_pl.yolo.network import ultralytics_version

    return {"cellseg_pl": cellseg_pl.__version__, "ultralytics": ultralytics_version(),
            "python": sys.version.split()[0]}


def now() -> str:
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
        counts = f", {s['train']} train / {s['val']} val images, {s['cells']} cells" if "train" in s else ""
        source = f", zip sha256 `{s['zip_sha256'][:16]}...`" if "zip_sha256" in s else (
            f", {s['data']}" if s.get("data") else "")
        lines.append(f"- trained on: {s['set']}{counts}{source}")
    if card.get("command"):
        lines.append(f"- command: `{card['command']}`")
    write_atomic(lab.root / "models" / f"v{version}.md", "\n".join(lines) + "\n")
