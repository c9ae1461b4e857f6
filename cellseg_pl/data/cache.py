"""Decode once: the resized images of a split kept in RAM or as ``.npz`` files on disk (``--data.cache``).

A mosaic sample reads four images and copy-paste a fifth: without a cache every one is a PNG/JPEG decode and a
resize, more than half of the loader's time at imgsz 640. The cache is filled in the main process before the
loader workers start; forked workers share its memory (copy-on-write, never written), so RAM use does not grow
with ``num_workers``. Every process of a multi-GPU run holds its own copy.

Modes (Ultralytics' names):

* ``ram``: all images in memory, about ``n * imgsz^2 * 3`` bytes per process at most (2,726 images at 640 px:
  3.3 GB at most; 640x480 images take 2.5 GB). When that is over the budget (half the available memory, shared by
  the processes of this node) the run goes on without a cache and says so in one log line.
* ``disk``: ``.npz`` arrays in ``<dataset folder>/.cellseg_cache/<imgsz>/``, named by a hash of the image's path,
  size, modification time, first and last KiB, and ``imgsz`` (a changed image gets a new entry); read back in well
  under a millisecond.
  The disk cache heals itself: an entry that does not read back whole (a full disk, a folder copied in part) is
  written again, once per run, with one log line per split; one damaged later is decoded instead; the half-written
  files of a killed run are removed; a folder that cannot be written costs one log line and training goes on
  without those entries. An image replaced by another of the same size and modification time gets a new entry
  too (its first or last KiB differ); only an edit of the bytes in between that keeps size, time and both ends
  would be served stale (clear ``.cellseg_cache/`` after such a tool).
* ``auto`` (default): ``ram`` when it fits the budget, else no cache.
* ``none``: decode every time.

The cache holds exactly what :func:`cellseg_pl.data.dataset.load_resized` returns, so samples (a pure function of seed,
epoch and index) are the same with and without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cellseg_pl.data.images import load_resized
from cellseg_pl.errors import DatasetError, UsageError
from cellseg_pl.files import partial_path, pid_alive, remove_stale_partials

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "ram", "disk", "auto")
#: Half-written entries of versions before the one naming scheme of :mod:`cellseg_pl.files`.
_OLD_PARTIAL = re.compile(r"^[0-9a-f]{40}\.partial-(?P<pid>\d+)-\d+$")


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``), or total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class ImageCache:
    """Resized images of one split, by index (see the module docstring for the modes).

    Args:
        images: the split's image files, in the data set's order.
        imgsz: long side of the cached images.
        mode: ``none``, ``ram``, ``disk`` or ``auto``.
        disk_dir: folder of the disk cache (``<dataset folder>/.cellseg_cache``).
        processes: processes on this node that each fill a cache (the devices of a multi-GPU run).
        budget: bytes all those processes may use for RAM caches (default: half the available memory).
        split: split name for log lines.
    """

    def __init__(
        self,
        images: list[Path],
        imgsz: int,
        mode: str = "auto",
        disk_dir: Path | None = None,
        processes: int = 1,
        budget: int | None = None,
        split: str = "train",
    ) -> None:
        if mode not in CACHE_MODES:
            raise UsageError(f"--data.cache: '{mode}' is not one of {', '.join(CACHE_MODES)}")
        self.images, self.imgsz = list(images), imgsz
        self._ram: list[tuple[np.ndarray, tuple[int, int]] | None] | None = None
        self._files: list[Path | None] | None = None
        self.mode = "none"
        if mode == "none" or not self.images:
            return
        if mode in ("ram", "auto"):
            need = len(self.images) * imgsz * imgsz * 3 * max(processes, 1)
            budget = available_memory() // 2 if budget is None else budget
            if need <= budget:
                self._ram = self._fill(lambda i: self._decode(i))
                self.mode = "ram"
                used = sum(a[0].nbytes for a in self._ram if a is not None)
                log.info("cache: %s images of %s in RAM, %s (at most %s for %d process(es); budget %s)",
                         len(self.images), split, _gib(used), _gib(need), processes, _gib(budget))
            else:
                log.info("cache: %s images of %s not cached: up to %s for %d process(es) is over the RAM budget %s "
                         "(half the available memory); decoding each time (--data.cache disk keeps them on disk)",
                         len(self.images), split, _gib(need), processes, _gib(budget))
            return
        root = Path(disk_dir) / f"imgsz{imgsz}"
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("cache: cannot write the disk cache %s (%s); decoding each time", root, e.strerror or e)
            return
        remove_stale_partials(root, ".npz", "a killed run filling the cache")
        for entry in root.iterdir():
            old = _OLD_PARTIAL.match(entry.name)
            if old and entry.is_file() and not pid_alive(int(old["pid"])):
                entry.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._damaged: list[Path] = []
        self._unwritable: list[tuple[Path, str]] = []
        self._files = self._fill(lambda i: self._to_disk(i, root))
        self._lock = None  # (the loader workers get a copy of this object: nothing left to lock)
        self.mode = "disk"
        if self._damaged:
            log.warning("cache: %d damaged entries of %s in %s (e.g. %s) written again", len(self._damaged), split,
                        root, self._damaged[0].name)
        if self._unwritable:
            path, why = self._unwritable[0]
            log.warning("cache: cannot write %d of %d entries of %s in %s (%s: %s); those images are decoded each "
                        "time", len(self._unwritable), len(self.images), split, root, path.name, why)
        log.info("cache: %d images of %s on disk in %s", sum(f is not None for f in self._files), split, root)
        self._warned = False

    def _fill(self, fn) -> list:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # OpenCV decodes without the GIL
            return list(pool.map(fn, range(len(self.images))))

    def _decode(self, index: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        try:
            return load_resized(self.images[index], self.imgsz)
        except DatasetError:
            return None  # (the loader decodes it again and reports it as the data set does)

    def _to_disk(self, index: int, root: Path) -> Path | None:
        path = self.images[index]
        try:
            st = path.stat()
            ends = _ends(path, st.st_size)
        except OSError:
            return None
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.imgsz}|".encode() + ends).hexdigest()
        target = root / f"{key}.npz"
        if target.exists():
            if _read(target) is not None:
                return target
            with self._lock:
                self._damaged.append(target)
        decoded = self._decode(index)
        if decoded is None:
            return None
        tmp = partial_path(target, tag=index)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, image=decoded[0], shape=np.asarray(decoded[1]))
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._unwritable.append((target, str(e.strerror or e)))
            return None
        return target

    def get(self, index: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        """``(image, (h0, w0))`` of image ``index`` as ``load_resized`` gives it (do not modify the image), or None
        when it is not cached."""
        if self._ram is not None:
            return self._ram[index]
        if self._files is not None and self._files[index] is not None:
            got = _read(self._files[index])
            if got is None:  # damaged since the run started: decoded instead (it is written again next run)
                if not self._warned:
                    log.warning("cache: %s no longer reads back; decoding such images instead", self._files[index])
                    self._warned = True
                self._files[index] = None
            return got
        return None


def _ends(path: Path, size: int) -> bytes:
    """The first and the last KiB of a file: part of an entry's key, so that an image replaced by another of the same
    size and modification time (a copy that keeps times, a camera that numbers from 1 again) gets a new entry."""
    with open(path, "rb") as f:
        head = f.read(_ENDS)
        if size > 2 * _ENDS:
            f.seek(-_ENDS, os.SEEK_END)
        return head + f.read(_ENDS)


_ENDS = 1024


def _read(path: Path) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A disk entry's ``(image, (h0, w0))``, or None when it does not read back whole (any damage: a truncated or
    overwritten zip, a wrong CRC, a missing array)."""
    try:
        with np.load(path) as z:
            return z["image"], tuple(int(v) for v in z["shape"])
    except Exception:  # noqa: BLE001 - zipfile, zlib and numpy each raise their own kind of damage
        return None
