"""What ``convert`` reports: why annotations and images were skipped, the summary it prints, the error it raises.

The reason tables (:data:`ANNOTATION_SKIPS`, :data:`IMAGE_SKIPS`, :data:`NOTES`) are the keys of
:class:`ConvertSummary`'s counters, and their meanings the text of its summary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cellseg_pl.cvat.coco import count_reason, reason_lines

#: Why an annotation was not written, as printed in the summary.
ANNOTATION_SKIPS = {
    "box_only": "box-only (empty segmentation): no mask to train on, not written",
    "unknown_image": "image_id not listed in 'images'",
    "unknown_category": "category_id not listed in 'categories'",
    "invalid_polygon": "no polygon part with >= 3 points and an even number of finite coordinates",
    "coordinates_out_of_range": "polygon coordinates beyond +-1e12 px: no position in any image",
    "invalid_rle": "RLE whose size differs from the image or whose runs are malformed",
    "invalid_segmentation": "segmentation is neither polygons nor RLE",
    "empty_mask": "zero area inside the image",
    "too_small": "too thin or small for an outline of >= 3 points",
    "image_skipped": "its image was skipped",
}
#: Why an image was not written.
IMAGE_SKIPS = {
    "missing_file": "file in neither the zip nor --images-dir",
    "corrupt_image": "bytes that cannot be read or that OpenCV cannot decode",
    "too_large": "over the pixel limit (2^28 px): tile it, or raise CV_IO_MAX_IMAGE_PIXELS",
    "size_mismatch": "decoded size differs from width/height in the JSON",
    "invalid_file_name": "file_name empty, not a string, or escaping its folder ('..', absolute path)",
    "duplicate_image_id": "image id listed twice in one annotation file (the first is kept)",
}
#: Things fixed on the way, still written.
NOTES = {
    "clipped": "annotations with coordinates outside the image, clipped to it",
    "dropped_parts": "invalid polygon parts dropped from otherwise valid annotations",
    "multi_part": "instances with several disconnected parts, joined into one outline",
    "merged_categories": "categories sharing a name (CVAT matches labels by name), merged into one class",
    "images_missing_objects": "images written although some of their annotations were skipped: "
    "those objects look like background to training",
}
@dataclass
class ConvertSummary:
    """What :func:`convert_coco_zip` wrote and skipped.

    Counter keys are the keys of ``ANNOTATION_SKIPS``, ``IMAGE_SKIPS`` and ``NOTES``. Every annotation in
    the JSON is either written (``instances``) or counted once in ``skipped_annotations``.
    """

    coco_zip: Path
    output_dir: Path
    names: dict[int, str]
    train_images: int = 0
    val_images: int = 0
    background_images: int = 0
    annotations_read: int = 0
    instances: Counter = field(default_factory=Counter)
    skipped_annotations: Counter = field(default_factory=Counter)
    skipped_images: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def instances_written(self) -> int:
        """Label lines written, all classes."""
        return sum(self.instances.values())

    def count(self, kind: Counter, reason: str, example: str) -> None:
        """Add one to ``kind[reason]`` and keep the first few examples for the summary."""
        count_reason(kind, self.examples, reason, example)

    def format(self) -> str:
        """The human-readable report ``main`` prints."""
        lines = [
            f"converted {self.coco_zip} -> {self.output_dir}",
            f"images: {self.train_images + self.val_images} (train {self.train_images}, val {self.val_images}),"
            f" {self.background_images} without instances (background)",
            f"instances written: {self.instances_written} of {self.annotations_read} annotations ("
            + ", ".join(f"{self.names[c]}: {self.instances[c]}" for c in sorted(self.names))
            + ")",
        ]
        lines += reason_lines(
            [("skipped images", self.skipped_images, IMAGE_SKIPS),
             ("skipped annotations", self.skipped_annotations, ANNOTATION_SKIPS), ("notes", self.notes, NOTES)],
            self.examples,
        )  # fmt: skip
        lines.append(f"dataset: {self.output_dir / 'dataset.yaml'}")
        return "\n".join(lines)
