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

from cellseg_pl.cache import CACHE_MODES, ImageCache, available_memory
from cellseg_pl.dataset import IMAGE_SUFFIXES, Collate, DatasetError, YoloSegDataset, load_dataset_yaml
from cellseg_pl.scan import ScanResult, scan_split, shared_images
from cellseg_pl.transforms import AUGMENTATION_KNOBS, TrainTransform, ValTransform

log = logging.getLogger(__name__)


def _cores() -> int:
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


class CellSegDataModule(L.LightningDataModule):
    """Feeds YOLO-seg data to the model; augmentation knobs carry Ultralytics' names and defaults.

    Args:
        dataset: path to a YOLO-seg ``dataset.yaml`` (keys ``path``, ``train``, ``val``, ``names``).
        imgsz: network input side in px (multiple of 32).
        batch_size: images per batch and per device (Ultralytics' ``batch`` is the total over devices).
        num_workers: data-loading worker processes per device (Ultralytics' ``workers``), or ``auto``: on a GPU,
            this node's CPU cores divided by its devices, less one for the training process when that leaves more
            than one, at most 8 (2 cores: 2 workers; 16 cores and one GPU: 8); on the CPU, none up to 4 cores per
            process (the step itself needs the cores; Ultralytics also loads in the training process on the CPU),
            else a quarter of them, at most 8.
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
            ``<dataset folder>/.cellseg_cache``) or ``none`` (see :mod:`cellseg_pl.cache`).
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
        degrees: float = 0.0,
        translate: float = 0.1,
        scale: float = 0.5,
        shear: float = 0.0,
        perspective: float = 0.0,
        flipud: float = 0.0,
        fliplr: float = 0.5,
        hsv_h: float = 0.015,
        hsv_s: float = 0.7,
        hsv_v: float = 0.4,
        mosaic: float = 1.0,
        mixup: float = 0.0,
        copy_paste: float = 0.0,
        copy_paste_mode: Literal["flip", "free"] = "flip",
        close_mosaic: int = 10,
        cache: str = "auto",
        predict_images: str | None = None,
    ) -> None:
        super().__init__()
        if imgsz < 32 or imgsz % 32:
            raise ValueError(f"--data.imgsz: {imgsz} is not a positive multiple of 32 (the network's largest stride)")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size: must be >= 1, got {batch_size}")
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"--data.num_workers: must be 'auto' or an integer >= 0, got {num_workers!r}")
        if cache not in CACHE_MODES:
            raise ValueError(f"--data.cache: '{cache}' is not one of {', '.join(CACHE_MODES)}")
        self.save_hyperparameters()
        self.spec = load_dataset_yaml(dataset)
        for split in ("train", "val"):
            if not self.spec.splits.get(split):
                raise DatasetError(f"--data.dataset: {dataset}: the '{split}' split has no images")
        # the augmentation knobs are TrainTransform's own parameters, passed by name (tests/test_datamodule.py
        # checks that this signature repeats them with the same names, types and defaults)
        self.train_transform = TrainTransform(imgsz, **{k: self.hparams[k] for k in AUGMENTATION_KNOBS})
        # Shared memory: persistent loader workers read the current epoch from it (augmentation seeds).
        self._epoch = multiprocessing.Value("i", 0, lock=False)
        self._scans: dict[str, ScanResult] = {}
        self._caches: dict[str, ImageCache] = {}

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
        """Scan the splits the stage reads, once and before the first step (:mod:`cellseg_pl.scan`).

        Bad images and label lines are skipped and counted in one logged summary per split; a fatal problem (a
        class index beyond ``names``, unreadable files, ...) raises :class:`DatasetError` naming the file and line.
        """
        if stage == "fit":
            self._share_cpu()
        test = "test" if self.spec.splits.get("test") else "val"
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": (test,)}.get(stage, ()):
            self._usable(split)
        if "train" in self._scans and "val" in self._scans:
            shared = shared_images(self._scans["train"], self._scans["val"])
            if shared and self._is_global_zero():
                log.warning(
                    "%d val image(s) also in train (same bytes), e.g. %s = %s: validation metrics overestimate",
                    len(shared), *shared[0],
                )

    def _share_cpu(self) -> None:
        """Training on the CPU: torch threads = this node's cores divided by its processes, unless the user's
        environment set ``OMP_NUM_THREADS`` (a SLURM job's ``--cpus-per-task``, say).

        The loader workers decode on one thread each and wait for the step most of the time, so no core is kept
        back for them. Measured on 2 cores (HeLa tiles at 320 px, yolov8n-seg, batch 8, epochs 2-3): 2 threads and
        no worker trained an epoch in 15-18 s, 2 threads beside 2 workers in 16-19 s, 1 thread beside 2 workers
        (a core left to each worker, as this module did before) in 28-30 s. Ultralytics trains on ``cores - 1``
        threads with no worker: 1 thread on 2 cores.
        """
        trainer = self.trainer
        if trainer is None or not isinstance(trainer.accelerator, CPUAccelerator):
            return
        from cellseg_pl import USER_OMP_NUM_THREADS

        share = max(1, _cores() // max(trainer.num_devices, 1))
        if USER_OMP_NUM_THREADS:
            threads = torch.get_num_threads()
        else:
            threads = share
            torch.set_num_threads(threads)  # also undoes the OMP_NUM_THREADS=1 that importing Ultralytics sets
        log.info("CPU training: %d torch thread(s) per process, %d loader worker(s)", threads, self.num_workers)
        if threads < share:
            log.info(
                "OMP_NUM_THREADS=%s: the step uses %d of this process' %d cores (unset it to use them all; a "
                "parent process that imported Ultralytics sets it to 1)", USER_OMP_NUM_THREADS, threads, share,
            )

    def _is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def _usable(self, split: str) -> list[Path]:
        """The split's images that passed the scan (scanned on first use)."""
        if split not in self._scans:
            self._scans[split] = scan_split(
                self.spec.splits[split], self.num_classes, split, self.spec.root, log_summary=self._is_global_zero()
            )
        return self._scans[split].images

    def _cache(self, split: str) -> ImageCache:
        """The split's image cache, filled once (in this process, before the loader workers start)."""
        if split not in self._caches:
            trainer = self.trainer
            processes = trainer.num_devices if trainer is not None else 1
            splits = [s for s in ("train", "val") if self.spec.splits.get(s)]
            # one budget for the splits that will be cached: each gets its share of half the available memory
            budget = available_memory() // 2 // max(len(splits), 1)
            self._caches[split] = ImageCache(
                self._usable(split), self.hparams.imgsz, self.hparams.cache,
                self.spec.yaml_path.parent / ".cellseg_cache", processes=processes, budget=budget, split=split,
            )
        return self._caches[split]

    def _dataset(self, split: str, train: bool) -> YoloSegDataset:
        transform = self.train_transform if train else ValTransform(self.hparams.imgsz)
        return YoloSegDataset(
            self._usable(split), self.num_classes, self.hparams.imgsz, transform, seed=global_seed(),
            epoch=self._epoch, skip_unreadable=True, cache=self._cache(split),
        )

    def _sampler(self, dataset: YoloSegDataset, train: bool) -> Sampler | None:
        if train:
            return EpochShuffleSampler(len(dataset), global_seed())
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # every image exactly once over all processes, so metrics equal a single-process run's
            return UnrepeatedDistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False)
        return None

    @property
    def num_workers(self) -> int:
        """Loader workers per process: ``--data.num_workers``, with ``auto`` resolved for this node."""
        workers = self.hparams.num_workers
        if workers != "auto":
            return int(workers)
        trainer = self.trainer
        share = _cores() // max(trainer.num_devices if trainer is not None else 1, 1)
        if trainer is not None and isinstance(trainer.accelerator, CPUAccelerator):
            return 0 if share <= 4 else min(8, share // 4)
        return min(8, share - 1 if share > 2 else share)

    def _loader(self, dataset: YoloSegDataset, train: bool, full_masks: bool) -> DataLoader:
        batch_size = self.hparams.batch_size if train else self.hparams.batch_size * 2
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._sampler(dataset, train),
            # as Ultralytics: every image every epoch (a final batch of one image still gives BatchNorm one value
            # per pixel of each feature map; dropping it cost a tiny data set a fifth of its training)
            drop_last=False,
            num_workers=workers,
            collate_fn=Collate(self.hparams.mask_ratio, self.hparams.overlap_mask, full_masks=full_masks),
            pin_memory=torch.cuda.is_available(),
            # forking fresh workers every epoch costs seconds on small CPUs; the mosaic switch is shared memory
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.set_epoch(self.trainer.current_epoch, self.trainer.max_epochs or -1)
        return self._loader(self._dataset("train", train=True), train=True, full_masks=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", train=False), train=False, full_masks=True)

    def test_dataloader(self) -> DataLoader:
        split = "test" if self.spec.splits.get("test") else "val"
        return self._loader(self._dataset(split, train=False), train=False, full_masks=True)

    def predict_dataloader(self) -> DataLoader:
        folder = self.hparams.predict_images
        if not folder:
            raise ValueError("--data.predict_images: give the folder of images to predict on")
        root = Path(folder)
        if not root.is_dir():
            raise DatasetError(f"--data.predict_images: {root} is not a folder")
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"--data.predict_images: {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        dataset = YoloSegDataset(images, self.num_classes, self.hparams.imgsz, ValTransform(self.hparams.imgsz))
        # (prediction: Lightning adds its own unrepeated distributed sampler under DDP)
        return self._loader(dataset, train=False, full_masks=False)
