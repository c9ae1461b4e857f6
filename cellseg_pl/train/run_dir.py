"""Where a ``fit`` writes: the run folder ``<project>/<name>``, chosen once, and what a failed fit leaves behind.

A new ``fit`` never writes into a folder that holds an earlier run: ``name`` becomes ``name2``, ``name3``..., as with
``yolo segment train``. ``--ckpt_path last`` resumes the run in ``<project>/<name>`` itself. Under DDP every process
writes to the folder rank 0 chose (handed down in :data:`RUN_DIR_ENV`). Under SLURM the folder is taken as given
(give each job its own ``--name``, e.g. with ``$SLURM_JOB_ID``, which a requeued job keeps): a requeued job finds
its folder and resumes from the checkpoint Lightning wrote on the requeue signal (``hpc_ckpt_*.ckpt``), else from
``weights/last.ckpt``.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from cellseg_pl.errors import OutputError, UsageError

log = logging.getLogger(__name__)

#: The run folder rank 0 chose, handed to the worker processes Lightning's DDP launcher starts.
RUN_DIR_ENV = "CELLSEG_PL_RUN_DIR"


def choose_run_dir(folder: Path, ckpt_path: str | None) -> tuple[Path, str | None]:
    """The folder a ``fit`` writes to, and the checkpoint it resumes from.

    Args:
        folder: ``<project>/<name>``.
        ckpt_path: ``--ckpt_path`` as given.

    Returns:
        ``(run folder, ckpt_path)``: a restarted SLURM job resumes its own ``last.ckpt``.

    Raises:
        UsageError: ``--ckpt_path last`` without a ``last.ckpt`` in ``folder``.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if ckpt_path is None and os.environ.get(RUN_DIR_ENV) and int(os.environ.get("LOCAL_RANK", 0)) > 0:
        folder = Path(os.environ[RUN_DIR_ENV])  # a DDP worker process: rank 0's folder
    elif ckpt_path is None and SLURMEnvironment.detect():
        if not list(folder.glob("hpc_ckpt_*.ckpt")) and (folder / "weights" / "last.ckpt").is_file():
            log.info("SLURM job restarted: resuming %s from weights/last.ckpt", folder)
            ckpt_path = "last"
    elif ckpt_path is None:
        free = next_free_run_dir(folder)
        if free != folder:
            log.info("%s holds an earlier run; this run writes to %s", folder, free)
        folder = free
    elif ckpt_path == "last" and not (folder / "weights" / "last.ckpt").is_file():
        raise UsageError(
            f"--ckpt_path last: {folder / 'weights' / 'last.ckpt'} does not exist; give --project/--name of the run "
            f"to resume, or a checkpoint path"
        )
    os.environ[RUN_DIR_ENV] = str(folder)
    return folder, ckpt_path


def check_root_dir(cfg: Any, run_dir: Path) -> None:
    """Refuse a ``--trainer.default_root_dir`` that is not ``<project>/<name>``: the run folder is named once."""
    given = cfg.trainer.get("default_root_dir")
    if given is None or Path(given) == run_dir:
        return
    saved_dirpath = cfg.checkpoint.get("dirpath")
    if saved_dirpath is not None and Path(saved_dirpath) == Path(given) / "weights":
        # both derived folders of a config.yaml saved by an older version: the folder of the run it came from
        log.info("the config's trainer.default_root_dir %s is the run it was saved from; using %s", given, run_dir)
        return
    raise UsageError(
        f"--trainer.default_root_dir: {given} is not used; the run folder is <project>/<name> ({run_dir} here): "
        f"give --project {Path(given).parent} --name {Path(given).name} instead"
    )


def check_free_space(run_dir: Path, parameters: int) -> None:
    """Refuse to start a fit that cannot write its checkpoints: one line before anything is written, instead of a
    failure after the first epoch (and TensorBoard's writer thread dying with a traceback).

    A checkpoint holds about 16 bytes a parameter (weights, their EMA, AdamW's two moments: 53 MB for yolov8n-seg);
    a run holds ``best`` and ``last`` and writes the next ``last`` beside the old one, plus the ``.pt`` files: about
    2.5 checkpoints.
    """
    need = int(2.5 * 16 * parameters)
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return  # a file in the way: the error of creating the folder names it
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # (the folder's own error comes when it is created)
    if read_only or not os.access(folder, os.W_OK):
        why = "Read-only file system" if read_only else "Permission denied"
        raise OutputError(run_dir, f"{folder} cannot be written ({why})", "choose another --project")
    if free < need:
        raise OutputError(run_dir, f"No space left on device: {free / 2**20:.0f} MiB free, a run of this model "
                          f"writes about {need / 2**20:.0f} MiB of checkpoints", "free some space or choose another "
                          "--project")


def has_run(folder: Path) -> bool:
    """Whether ``folder`` already holds results of a run."""
    return (folder / "weights").exists() or (folder / "results.csv").exists() or (folder / "config.yaml").exists()


def remove_failed_fit_files(folder: Path, before: set[Path] | None, top: Path | None = None) -> None:
    """After a failed ``fit``: remove what it wrote (``config.yaml``, TensorBoard events, pictures) unless it wrote a
    checkpoint or a ``results.csv`` row (then the run can be resumed or read: everything is kept).

    Args:
        folder: the run folder.
        before: the paths under it before the fit started, or None when the fit created it (then it goes too).
        top: the outermost folder the fit created above ``folder`` (e.g. a new ``--project``); removed if empty.
    """
    if not folder.is_dir() or (folder / "results.csv").exists() or any((folder / "weights").glob("*.ckpt")):
        return
    created = sorted((p for p in folder.rglob("*") if before is None or p not in before), reverse=True)
    for path in created:  # deepest first: files, then the folders they were in
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)
    if before is None:
        for parent in (folder, *folder.parents):
            if not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
            if parent == (top or folder):
                break
    if created:
        log.info("the run failed before its first checkpoint: removed what it wrote to %s", folder)


def outermost_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None when ``folder`` exists)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def next_free_run_dir(folder: Path) -> Path:
    """``folder`` if it holds no run, else the first of ``folder2``, ``folder3``... that does not."""
    if not has_run(folder):
        return folder
    n = 2
    while has_run(folder.with_name(f"{folder.name}{n}")):
        n += 1
    return folder.with_name(f"{folder.name}{n}")


@contextmanager
def removed_if_fit_fails(folder: Path, is_rank_zero: Callable[[], bool]) -> Iterator[None]:
    """Run a ``fit`` in ``folder``; if it fails before writing any checkpoint, rank 0 removes the files it wrote
    (:func:`remove_failed_fit_files`) and the error goes on."""
    before = set(folder.rglob("*")) if folder.is_dir() else None
    top = outermost_missing(folder)
    try:
        yield
    except BaseException:
        if is_rank_zero():
            remove_failed_fit_files(folder, before, top)
        raise
