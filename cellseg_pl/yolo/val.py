"""``yolo segment val``'s own mask mAP of a model file: the figure the lab's history is written in."""

from __future__ import annotations

from pathlib import Path


def ultralytics_val(model: str | Path, data: str | Path, imgsz: int, project: str | Path, device: str = "cpu",
                    batch: int = 8) -> dict[str, float]:
    """Score an Ultralytics ``.pt`` on the ``val`` split of ``data`` with Ultralytics' validator.

    Ultralytics compares masks at a quarter of the input resolution, so its mask mAP of small cells is lower than
    the full-resolution COCO figure of :func:`cellseg_pl.evaluate.evaluate`; both are reported, each under its name.
    Anything the validator writes goes under ``project``.

    Returns:
        ``mAP50(M)``, ``mAP50-95(M)``, ``mAP50(B)``, ``mAP50-95(B)``.
    """
    from ultralytics import YOLO

    metrics = YOLO(str(model)).val(data=str(data), split="val", imgsz=imgsz, batch=batch, device=device, plots=False,
                                   workers=0, project=str(project), name="ultralytics_val", exist_ok=True,
                                   verbose=False)
    return {"mAP50(M)": float(metrics.seg.map50), "mAP50-95(M)": float(metrics.seg.map),
            "mAP50(B)": float(metrics.box.map50), "mAP50-95(B)": float(metrics.box.map)}
