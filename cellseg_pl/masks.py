"""Instance masks kept near their objects (:class:`MaskWindows`), and their COCO run-length encoding.

A 640 px validation image has up to 300 detections. As full ``(n, H, W)`` masks that is 123 MB to allocate, fill
and scan per image, although a cell covers a few hundred pixels. Here each mask is kept in a *window*, a rectangle
of the image that holds all its pixels; windows of similar size share one padded stack (a :class:`MaskGroup`), so
building, encoding and drawing a whole image's masks takes a few array operations per group, whatever the count.

Every producer of masks for the metrics goes through here: the predicted masks of
:func:`cellseg_pl.yolo.postprocess.box_mask_windows`, the true masks of a validation batch
(:meth:`MaskWindows.from_label_map`), full masks (:meth:`MaskWindows.from_dense`) and crops
(:meth:`MaskWindows.from_crops`). :meth:`MaskWindows.overlaps` counts each mask's pixels on each instance of a label
map (what validation scores: the IoUs, without encoding anything); :meth:`MaskWindows.encode` gives the RLEs and
areas that pycocotools' ``mask.encode`` and ``mask.area`` give for the full masks (the evaluator of saved
predictions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

T = TypeVar("T")

#: masks per group: windows are sorted by size and padded to the largest of their group
GROUP_SIZE = 16


@dataclass(frozen=True)
class MaskGroup:
    """Masks of one image that share a padded window size.

    Attributes:
        masks: (m, R, C) bool; pixel (y, x) of mask k is ``masks[k, y - top[k], x - left[k]]`` when that lies in the
            window, False otherwise. Window pixels outside the image are False.
        left, top: (m,) int64, the windows' top-left corners in image px (>= 0).
        index: (m,) int64, the masks' positions in the :class:`MaskWindows`.
    """

    masks: torch.Tensor
    left: torch.Tensor
    top: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class MaskWindows:
    """``count`` instance masks of an image of ``size`` = (H, W) px, held in :class:`MaskGroup` windows."""

    size: tuple[int, int]
    count: int
    groups: tuple[MaskGroup, ...]

    def __len__(self) -> int:
        return self.count

    def dense(self, device: torch.device | str | None = None, indices: list[int] | None = None) -> torch.Tensor:
        """The masks (all, or ``indices`` in that order) as a (n, H, W) bool tensor (for drawing; the metrics never
        need it)."""
        h, w = self.size
        position = dict(zip(indices, range(len(indices)))) if indices is not None else None
        out = torch.zeros((self.count if indices is None else len(indices), h, w), dtype=torch.bool, device=device)
        for g in self.groups:
            _, rows, cols = g.masks.shape
            for k, x0, y0, m in zip(g.index.tolist(), g.left.tolist(), g.top.tolist(), g.masks):
                if position is not None and k not in position:
                    continue
                r, c = min(rows, h - y0), min(cols, w - x0)
                if r > 0 and c > 0:
                    out[k if position is None else position[k], y0 : y0 + r, x0 : x0 + c] = m[:r, :c].to(out.device)
        return out

    def encode(self, indices: list[int] | None = None) -> tuple[list[dict], list[int]]:
        """COCO RLEs (compressed, as ``pycocotools.mask.encode`` gives them) and areas (pixel counts) of the masks,
        in mask order, or of ``indices`` in that order."""
        from pycocotools import mask as mask_utils

        h, w = self.size
        runs: list = [None] * self.count
        areas: list = [0] * self.count
        for g in self.groups:
            for k, r, a in zip(g.index.tolist(), *_group_runs(g, h, w)):
                runs[k], areas[k] = r, a
        order = range(self.count) if indices is None else indices
        if not len(order):
            return [], []
        rles = mask_utils.frPyObjects([{"size": [h, w], "counts": runs[k]} for k in order], h, w)
        return rles, [areas[k] for k in order]

    def overlaps(self, labels: torch.Tensor | np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Each mask's pixels over an (H, W) label map whose instance k (0-based) holds k + 1 (0: background).

        Returns:
            ``(intersections, areas)``: (n, count) int64 pixel counts of mask i on instance k, and (n,) int64 mask
            areas: what COCO's mask IoU reads from the RLEs, counted in the windows without encoding them.

        Each group's windows of the label map are cut out of a padded copy in one gather and zeroed outside their
        masks; the labels left are read a machine word (8 bytes) at a time, so only the words that touch an
        instance are counted (the windows of low-confidence detections are mostly background).
        """
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        h, w = self.size
        if lab.shape != (h, w):
            raise ValueError(f"overlaps: a label map of {lab.shape} for masks of {(h, w)}")
        if lab.size and int(lab.max()) > count:
            raise ValueError(f"overlaps: the label map holds {int(lab.max())} instances, not {count}")
        inter, areas = np.zeros((self.count, count), np.int64), np.zeros(self.count, np.int64)
        if not self.groups:
            return inter, areas
        dtype = np.uint8 if count < 2**8 else np.uint16 if count < 2**16 else np.uint32
        per_word = 8 // np.dtype(dtype).itemsize  # labels per 8-byte word
        rows_max = max(g.masks.shape[1] for g in self.groups)
        cols_max = max(g.masks.shape[2] for g in self.groups) + per_word
        padded = np.zeros((h + 1 + rows_max, w + 1 + cols_max), dtype)  # (windows start at most at (h, w))
        padded[:h, :w] = lab
        s0, s1 = padded.strides
        per = count + 1
        for g in self.groups:
            masks = g.masks.detach().cpu().numpy()
            m, rows, cols = masks.shape
            cols_w = -(-cols // per_word) * per_word  # whole words per window row
            every = as_strided(padded, (h + 1, w + 1, rows, cols_w), (s0, s1, s0, s1), writeable=False)
            under = every[g.top.cpu().numpy(), g.left.cpu().numpy()]  # (m, rows, cols_w) copy
            np.multiply(under[:, :, :cols], masks, out=under[:, :, :cols], casting="unsafe")
            under[:, :, cols:] = 0
            words = np.flatnonzero(under.reshape(-1).view(np.uint64))
            labels_in = under.reshape(-1, per_word)[words]  # (words, per_word)
            owner = (words // (rows * cols_w // per_word)) * per  # the mask of each word, times ``per``
            counts = np.bincount((owner[:, None] + labels_in).reshape(-1), minlength=m * per).reshape(m, per)
            index = g.index.cpu().numpy()
            inter[index] = counts[:, 1:]
            areas[index] = masks.reshape(m, -1).view(np.uint8).sum(1, dtype=np.uint32)
        return inter, areas

    @classmethod
    def from_dense(cls, masks: torch.Tensor | np.ndarray, boxes: torch.Tensor | np.ndarray | None = None
                   ) -> MaskWindows:  # fmt: skip
        """Windows of full (n, H, W) bool masks: their boxes ((n, 4) xyxy px, when every mask is known to lie inside
        its box; only the box is read), else each mask's extent (the whole stack is scanned once)."""
        m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        m = m.astype(bool, copy=False)
        n, h, w = m.shape
        if boxes is not None:
            b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
            b = np.concatenate([np.floor(b[:, :2]), np.ceil(b[:, 2:])], 1).reshape(n, 4)
            x0, y0, x1, y1 = b.clip(0, [w, h, w, h]).astype(np.int64).T
        else:
            x0, x1 = _extent(m.any(axis=1))
            y0, y1 = _extent(m.any(axis=2))
        windows = [m[k, y0[k] : y1[k], x0[k] : x1[k]] for k in range(n)]
        return cls._from_arrays(windows, x0, y0, (h, w))

    @classmethod
    def from_label_map(cls, labels: torch.Tensor | np.ndarray, count: int) -> MaskWindows:
        """The masks of an (H, W) integer map whose pixels of instance k (0-based) hold k + 1 (0: background)."""
        from scipy import ndimage

        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        slices = ndimage.find_objects(lab, max_label=count) if count else []
        x0, y0 = np.zeros(count, np.int64), np.zeros(count, np.int64)
        windows = []
        for k, sl in enumerate(slices):
            if sl is None:  # an instance without pixels (rasterized to nothing)
                windows.append(np.zeros((0, 0), bool))
                continue
            y0[k], x0[k] = sl[0].start, sl[1].start
            windows.append(lab[sl] == k + 1)
        return cls._from_arrays(windows, x0, y0, lab.shape)

    @classmethod
    def from_crops(cls, crops: list[tuple[np.ndarray, int, int]], height: int, width: int) -> MaskWindows:
        """Masks given as crops ``(mask, x0, y0)``: a (h, w) bool array whose top-left pixel is pixel (x0, y0) of a
        (height, width) image (what :class:`cellseg_pl.infer.engine.Instance` holds); parts outside the image are
        dropped."""
        x0, y0, windows = np.zeros(len(crops), np.int64), np.zeros(len(crops), np.int64), []
        for k, (mask, cx, cy) in enumerate(crops):
            mask = np.asarray(mask, bool)
            sx, sy = max(-cx, 0), max(-cy, 0)  # crop pixels left of / above the image
            x0[k], y0[k] = max(cx, 0), max(cy, 0)
            windows.append(mask[sy : sy + max(height - y0[k], 0), sx : sx + max(width - x0[k], 0)])
        return cls._from_arrays(windows, x0, y0, (height, width))

    @classmethod
    def _from_arrays(cls, windows: list[np.ndarray], left: np.ndarray, top: np.ndarray, size: tuple[int, int]
                     ) -> MaskWindows:  # fmt: skip
        """Group per-mask window arrays (each inside the image) into padded stacks."""
        shapes = np.array([w.shape for w in windows], np.int64).reshape(-1, 2)
        groups = []
        for index in size_groups(shapes[:, 0], shapes[:, 1]):
            rows, cols = max(int(shapes[index, 0].max()), 1), max(int(shapes[index, 1].max()), 1)
            stack = np.zeros((len(index), rows, cols), bool)
            for j, k in enumerate(index.tolist()):
                r, c = windows[k].shape
                stack[j, :r, :c] = windows[k]
            groups.append(MaskGroup(torch.from_numpy(stack), torch.from_numpy(left[index]),
                                    torch.from_numpy(top[index]), torch.from_numpy(index)))  # fmt: skip
        return cls(size=(int(size[0]), int(size[1])), count=len(windows), groups=tuple(groups))


def map_on_threads(fn: Callable[..., T], *iterables: Iterable) -> list[T]:
    """``list(map(fn, *iterables))`` on as many threads as torch uses (numpy releases the GIL while it gathers and
    counts a batch's masks, so a validation batch is scored on all the cores the process was given)."""
    items = list(zip(*iterables))
    threads = min(torch.get_num_threads(), len(items))
    if threads <= 1:
        return [fn(*args) for args in items]
    return list(_pool(threads).map(lambda args: fn(*args), items))


_POOLS: dict = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool of this process (a forked child makes its own: threads do not survive a fork)."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="cellseg_pl-masks")
    return _POOLS[key]


def size_groups(rows: np.ndarray | torch.Tensor, cols: np.ndarray | torch.Tensor) -> list:
    """Indices of windows (``rows`` x ``cols`` each) sorted by area, in groups of at most :data:`GROUP_SIZE`, so that
    padding each group to its largest window wastes little."""
    if isinstance(rows, torch.Tensor):
        order = torch.argsort(rows * cols, stable=True)
    else:
        order = np.argsort(np.asarray(rows) * np.asarray(cols), kind="stable")
    return [order[i : i + GROUP_SIZE] for i in range(0, len(order), GROUP_SIZE)]


def _extent(occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last True index per row of an (n, L) bool array (0, 0 for an empty row)."""
    any_ = occupied.any(axis=1)
    first = np.where(any_, occupied.argmax(axis=1), 0)
    last = np.where(any_, occupied.shape[1] - occupied[:, ::-1].argmax(axis=1), 0)
    return first.astype(np.int64), last.astype(np.int64)


def _group_runs(group: MaskGroup, h: int, w: int) -> tuple[list[np.ndarray], list[int]]:
    """The uncompressed COCO runs (column-major, starting with background; uint32) and the area of each mask of a
    group.

    The windows are laid out column by column with a False row above and below each column, so that a run never
    continues from one column into the next inside the stack; every change of value then sits at one flat index of
    the stack, which maps to one flat index of the whole image, in order."""
    masks = group.masks.detach().cpu().numpy()
    m, rows, cols = masks.shape
    pitch = rows + 2
    flat = np.zeros((m, cols, pitch), bool)
    flat[:, :, 1 : rows + 1] = masks.transpose(0, 2, 1)
    flat = flat.reshape(m, cols * pitch)
    at = np.flatnonzero(flat[:, 1:] != flat[:, :-1])  # (np.nonzero of the 2-d array is ~10x slower)
    k, p = np.divmod(at, cols * pitch - 1)
    c, r = np.divmod(p + 1, pitch)
    left, top = group.left.cpu().numpy(), group.top.cpu().numpy()
    changes = (left[k] + c) * h + top[k] + r - 1  # flat column-major image index of each change
    # a window as tall as the image: an object ending in the last row and starting in the first row of the next
    # column is one run in the image, two changes at the same index in the stack (across the padding): drop both
    # (and an object that ends in the image's last pixel has no change after it)
    same = np.flatnonzero((changes[1:] == changes[:-1]) & (k[1:] == k[:-1]))
    keep = changes < h * w
    if len(same) or not keep.all():
        keep[same] = keep[same + 1] = False
        k, changes = k[keep], changes[keep]
    n_changes = np.bincount(k, minlength=m)
    # per mask: [0, changes..., h * w]; the differences are the runs (and one across masks, dropped)
    start = np.concatenate(([0], np.cumsum(n_changes + 2)[:-1]))
    bounds = np.empty(int(n_changes.sum()) + 2 * m, np.int64)
    bounds[start] = 0
    bounds[start + n_changes + 1] = h * w
    inner = np.ones(len(bounds), bool)
    inner[start] = inner[start + n_changes + 1] = False
    bounds[inner] = changes  # (sorted by mask, then position)
    runs = np.diff(bounds).astype(np.uint32)  # (the run across masks wraps; it is never read)
    mask_of = np.repeat(np.arange(m), n_changes + 2)[:-1]
    rank = np.arange(len(runs)) - start[mask_of]
    foreground = (rank % 2 == 1) & (rank <= n_changes[mask_of])  # runs alternate background, foreground
    areas = np.bincount(mask_of[foreground], weights=runs[foreground], minlength=m).astype(np.int64)
    return [runs[s : s + n + 1] for s, n in zip(start.tolist(), n_changes.tolist())], areas.tolist()
