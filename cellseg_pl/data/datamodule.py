"""LightningDataModule: a YOLO-seg ``dataset.yaml`` -> augmented train, letterboxed val/test/predict loaders."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from cellseg_pl.data.cache import CACHE_MODES, ImageCache, available_memory
from cellseg_pl.data.dataset import Collate, DatasetSpec, YoloSegDataset, load_dataset_yaml
from cellseg_pl.data.scan import ScanResult, scan_split, shared_images
from cellseg_pl.data.transforms import AUGMENTATION_KNOBS, Augmentation, TrainTransform, ValTransform
from cellseg_pl.errors import DatasetError, UsageError

log = logging.getLogger(__name__)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_init(worker_id: int) -> None:
    """Each loader worker decodes and warps on one thread: OpenCV's own thread pool in every worker would fight
    the training process and the other workers for the cores (as Ultralytics, ``cv2.setNumThreads(0)``)."""
    import cv2

    cv2.setNumThreads(0)


class EpochShuffleSampler(Sampler[int]):
    """Random order that is a pure function of ``(seed, epoch)``, so a resumed run sees the same order.

    Lightning calls ``set_epoch`` every epoch (and wraps this sampler in a distributed one under DDP).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def global_seed() -> int:
    """The seed ``seed_everything`` set (Lightning exports it as ``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def auto_workers(trainer: L.Trainer | None) -> int:
    """``--data.num_workers auto``: on a GPU, this node's cores divided by its devices, less one for the training
    process when that leaves more than one, at most 8; on the CPU, none up to 4 cores per process, else a quarter."""
    share = cores() // max(trainer.num_devices if trainer is not None else 1, 1)
    if trainer is not None and isinstance(trainer.accelerator, CPUAccelerator):
        return 0 if share <= 4 else min(8, share // 4)
    return min(8, share - 1 if share > 2 else share)


def sampler(dataset: YoloSegDataset, train: bool, trainer: L.Trainer | None) -> Sampler | None:
    """Training: :class:`EpochShuffleSampler`. Evaluation under DDP: every image exactly once over all processes,
    so the metrics equal a single-process run's."""
    if train:
        return EpochShuffleSampler(len(dataset), global_seed())
    if trainer is not None and trainer.world_size > 1:
        return UnrepeatedDistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False)
    return None


def make_loader(dataset: YoloSegDataset, batch_size: int, order: Sampler | None, workers: int,
                collate: Collate) -> DataLoader:  # fmt: skip
    """The loader of a split: every image every epoch, persistent workers, pinned memory on a GPU machine."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        # as Ultralytics: every image every epoch (a final batch of one image still gives BatchNorm one value per
        # pixel of each feature map; dropping it cost a tiny data set a fifth of its training)
        drop_last=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        # forking fresh workers every epoch costs seconds on small CPUs; the mosaic switch is shared memory
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
    )


class SplitImages:
    """Each split's usable images, scanned once (:mod:`cellseg_pl.data.scan`), and its image cache, filled once.

    Args:
        spec: the data set.
        imgsz: the size the cache keeps images at.
        cache: the cache mode (``--data.cache``).
    """

    def __init__(self, spec: DatasetSpec, imgsz: int, cache: str) -> None:
        self.spec, self.imgsz, self.mode = spec, imgsz, cache
        self.scans: dict[str, ScanResult] = {}
        self.caches: dict[str, ImageCache] = {}

    def usable(self, split: str, log_summary: bool = True) -> list[Path]:
        """The split's images that passed the scan (scanned on first use; the summary logged when ``log_summary``)."""
        if split not in self.scans:
            self.scans[split] = scan_split(self.spec.splits[split], self.spec.num_classes, split, self.spec.root,
                                           log_summary=log_summary)
        return self.scans[split].images

    def cache(self, split: str, processes: int = 1) -> ImageCache:
        """The split's image cache, filled once (in this process, before the loader workers start), shared by this
        node's ``processes``."""
        if split not in self.caches:
            splits = [s for s in ("train", "val") if self.spec.splits.get(s)]
            # one budget for the splits that will be cached: each gets its share of half the available memory
            budget = available_memory() // 2 // max(len(splits), 1)
            self.caches[split] = ImageCache(
                self.usable(split), self.imgsz, self.mode, self.spec.yaml_path.parent / ".cellseg_cache",
                processes=processes, budget=budget, split=split,
            )
        return self.caches[split]

    def warn_shared(self) -> None:
        """Log the validation images that are also training images (same bytes): their metrics overestimate."""
        if "train" in self.scans and "val" in self.scans:
            shared = shared_images(self.scans["train"], self.scans["val"])
            if shared:
                log.warning(
                    "%d val image(s) also in train (same bytes), e.g. %s = %s: validation metrics overestimate",
                    len(shared), *shared[0],
                )


class CellSegDataModule(L.LightningDataModule):
    """Feeds YOLO-seg data to the model; augmentation knobs carry Ultralytics' names and defaults.

    Args:
        dataset: path to a YOLO-seg ``dataset.yaml`` (keys ``path``, ``train``, ``val``, ``names``).
        imgsz: network input side in px (multiple of 32).
        batch_size: images per batch and per device (Ultralytics' ``batch`` is the total over devices).
        num_workers: data-loading worker processes per device (Ultralytics' ``workers``), or ``auto``: on a GPU,
            the node's cores per device less one, at most 8; on the CPU none up to 4 cores per process (the step
            needs them), else a quarter, at most 8.
        mask_ratio: mask targets are computed at ``imgsz / mask_ratio``.
        overlap_mask: one instance map per image as mask target (True), or one mask per instance.
        degrees: rotation range +- deg.
        translate: translation range +- fraction of the image side.
        scale: scale gain range ``1 +- scale``.
        shear: shear range +- deg.
        perspective: perspective distortion (0-0.001).
        flipud: probability of a vertical flip.
        fliplr: probability of a horizontal flip.
        hsv_h: hue jitter gain (fraction).
        hsv_s: saturation jitter gain (fraction).
        hsv_v: value jitter gain (fraction).
        mosaic: probability of a 4-image mosaic.
        mixup: probability of mixing two images.
        copy_paste: copy-paste strength (Ultralytics' ``copy_paste``): the share of eligible cells pasted as
            mirrored copies (``flip``), or the probability of pasting cells of another image (``free``).
        copy_paste_mode: ``flip`` (Ultralytics' default and algorithm: mirrored copies of the sample's own cells
            that overlap existing ones by under 30 %, before the warp) or ``free`` (cells of another image, rotated
            and scaled to the sample's zoom, into background they do not touch).
        close_mosaic: turn mosaic, copy-paste and mixup off for the last N epochs (0: never), as Ultralytics.
        cache: keep decoded, resized images: ``auto`` (in RAM when the train and val images fit half the available
            memory, shared by this node's processes; else none), ``ram``, ``disk`` (``.npz`` files in
            ``<dataset folder>/.cellseg_cache``) or ``none`` (see :mod:`cellseg_pl.data.cache`).
        predict_images: folder of images for the ``predict`` sub-command.
    """

    def __init__(
        self,
        dataset: str = "data/demo/dataset.yaml",
        imgsz: int = 640,
        batch_size: int = 16,
        num_workers: int | Literal["auto"] = "auto",
        mask_ratio: int = 4,
        overlap_mask: bool = True,
        degrees: float = Augmentation.degrees,
        translate: float = Augmentation.translate,
        scale: float = Augmentation.scale,
        shear: float = Augmentation.shear,
        perspective: float = Augmentation.perspective,
        flipud: float = Augmentation.flipud,
        fliplr: float = Augmentation.fliplr,
        hsv_h: float = Augmentation.hsv_h,
        hsv_s: float = Augmentation.hsv_s,
        hsv_v: float = Augmentation.hsv_v,
        mosaic: float = Augmentation.mosaic,
        mixup: float = Augmentation.mixup,
        copy_paste: float = Augmentation.copy_paste,
        copy_paste_mode: Literal["flip", "free"] = Augmentation.copy_paste_mode,
        close_mosaic: int = 10,
        cache: str = "auto",
        predict_images: str | None = None,
    ) -> None:
        super().__init__()
        if imgsz < 32 or imgsz % 32:
            raise UsageError(f"--data.imgsz: {imgsz} is not a positive multiple of 32 (the network's largest stride)")
        if batch_size < 1:
            raise UsageError(f"--data.batch_size: must be >= 1, got {batch_size}")
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise UsageError(f"--data.num_workers: must be 'auto' or an integer >= 0, got {num_workers!r}")
        if cache not in CACHE_MODES:
            raise UsageError(f"--data.cache: '{cache}' is not one of {', '.join(CACHE_MODES)}")
        self.save_hyperparameters()
        self.spec = load_dataset_yaml(dataset)
        for split in ("train", "val"):
            if not self.spec.splits.get(split):
                raise DatasetError(f"--data.dataset: {dataset}: the '{split}' split has no images")
        # (the augmentation knobs are Augmentation's fields: tests/test_datamodule.py checks that this signature
        # takes each of them, with its type and default)
        self.train_transform = TrainTransform(imgsz, Augmentation(**{k: self.hparams[k] for k in AUGMENTATION_KNOBS}))
        # Shared memory: persistent loader workers read the current epoch from it (augmentation seeds).
        self._epoch = multiprocessing.Value("i", 0, lock=False)
        self.images = SplitImages(self.spec, imgsz, cache)

    @property
    def num_classes(self) -> int:
        """Number of classes in ``dataset.yaml`` (linked to the model's ``num_classes``)."""
        return self.spec.num_classes

    @property
    def class_names(self) -> dict[int, str]:
        """Class index -> name from ``dataset.yaml`` (linked to the model's ``class_names``)."""
        return dict(self.spec.names)

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        """Set the epoch the augmentation seeds derive from, and apply ``close_mosaic``: mosaic, copy-paste and
        mixup off for the last N epochs (Ultralytics' ``close_mosaic`` turns all three off)."""
        self._epoch.value = epoch
        close = self.hparams.close_mosaic
        enabled = not (close and max_epochs > 0 and epoch >= max_epochs - close)
        mixed = [k for k in ("mosaic", "copy_paste", "mixup") if self.hparams[k] > 0]
        if enabled != self.train_transform.mixing_enabled and mixed:
            log.info("%s %s from epoch %d", ", ".join(mixed), "on" if enabled else "off (close_mosaic)", epoch + 1)
        self.train_transform.mixing_enabled = enabled

    def setup(self, stage: str) -> None:
        """Scan the splits the stage reads, once and before the first step (:mod:`cellseg_pl.data.scan`).

        Bad images and label lines are skipped and counted in one logged summary per split; a fatal problem (a
        class index beyond ``names``, unreadable files, ...) raises :class:`DatasetError` naming the file and line.
        """
        test = "test" if self.spec.splits.get("test") else "val"
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": (test,)}.get(stage, ()):
            self.images.usable(split, log_summary=self._is_global_zero())
        if stage == "fit" and self._is_global_zero():
            self.images.warn_shared()

    def _is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def split_dataset(self, split: str, train: bool = False) -> YoloSegDataset:
        """The data set of a split: augmented for training (``train``), letterboxed only otherwise."""
        transform = self.train_transform if train else ValTransform(self.hparams.imgsz)
        return YoloSegDataset(
            self.images.usable(split, log_summary=self._is_global_zero()), self.num_classes, self.hparams.imgsz,
            transform, seed=global_seed(), epoch=self._epoch, skip_unreadable=True,
            cache=self.images.cache(split, self.trainer.num_devices if self.trainer is not None else 1),
        )

    @property
    def num_workers(self) -> int:
        """Loader workers per process: ``--data.num_workers``, with ``auto`` resolved for this node."""
        workers = self.hparams.num_workers
        return int(workers) if workers != "auto" else auto_workers(self.trainer)

    def _loader(self, dataset: YoloSegDataset, train: bool, full_masks: bool) -> DataLoader:
        batch_size = self.hparams.batch_size if train else self.hparams.batch_size * 2
        collate = Collate(self.hparams.mask_ratio, self.hparams.overlap_mask, full_masks=full_masks)
        return make_loader(dataset, batch_size, sampler(dataset, train, self.trainer), self.num_workers, collate)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.set_epoch(self.trainer.current_epoch, self.trainer.max_epochs or -1)
        return self._loader(self.split_dataset("train", train=True), train=True, full_masks=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split_dataset("val", train=False), train=False, full_masks=True)

    def test_dataloader(self) -> DataLoader:
        split = "test" if self.spec.splits.get("test") else "val"
        return self._loader(self.split_dataset(split, train=False), train=False, full_masks=True)
