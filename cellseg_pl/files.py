"""Writing outputs so that a crash or a kill never leaves half of one: atomic files, and ``convert``'s folder.

Everything half-written has one naming scheme (:func:`partial_path`): the hidden ``.<name>.<kind>-<pid>[-<tag>]``
beside its target, where ``pid`` is the writing process, so a later run can tell a leftover of a killed process
from a file being written (:func:`remove_stale_partials`).

Files (every command: predictions, lists, plots, model files, checkpoints, the image cache): :func:`atomic_file` /
:func:`write_atomic` write to ``.<name>.partial-<pid>`` and rename it into place (or, with ``replace=False``, link
it, so an existing file is never replaced).

The output folder of ``convert``: checks before writing, a manifest, staging beside it and an atomic swap. A data
set is built in a hidden staging folder next to the target, ``.<name>.convert-staging-<pid>``, and only then takes
the target's name:

* a new or empty target: one ``rename``;
* ``--overwrite`` of an earlier data set: one ``renameat2(RENAME_EXCHANGE)`` swaps the two folders (Linux); the
  old set, now under the staging name, is deleted afterwards. Where the exchange is not supported the old set is
  first renamed to ``.<name>.convert-old-<pid>``, then the new one into place, then the old one deleted.

A kill at any point (even ``kill -9``) leaves either the old or the new set complete under the target's name; the
only exception is a kill between the two renames of the fallback, after which the next run puts the old set back.
The next run also removes the staging folders that killed runs left (only names of this pattern whose process is
gone) and logs what it removed.

``--overwrite`` only replaces a folder that ``convert`` wrote: it must hold :data:`MANIFEST`, which lists every
file ``convert`` wrote there. A folder with other files (besides caches made from the data set: cellseg_pl's
``.cellseg_cache/`` and Ultralytics' ``labels/<split>.cache``) is refused, naming them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cellseg_pl.errors import OutputError


logger = logging.getLogger(__name__)

#: The file naming what ``convert`` wrote into a data set folder (relative POSIX paths).
MANIFEST = ".cellseg_convert.json"
_MANIFEST_TOOL = "cellseg_pl.cvat.convert"
#: Files made from a data set by training tools: replaced with the data set, never "unrelated".
_DERIVED = (re.compile(r"^\.cellseg_cache(/.*)?$"), re.compile(r"^labels/[^/]+\.cache$"))
#: Names shown when a folder holds files ``convert`` did not write.
_SHOWN = 3


#: The names :func:`partial_path` gives: ``.<name>.<kind>-<pid>`` with an optional ``-<tag>``.
PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>[a-z]+(?:-[a-z]+)*)-(?P<pid>\d+)(?:-(?P<tag>\w+))?$")


def partial_path(path: Path, kind: str = "partial", tag: str | int = "") -> Path:
    """Where ``path`` is written before it takes its place: the hidden ``.<name>.<kind>-<pid>[-<tag>]`` beside it.

    Args:
        path: the file or folder being written.
        kind: what the temporary is (``partial``: a file being written; ``convert-staging``, ``convert-old``:
            :func:`swap_into_place`'s folders).
        tag: tells apart temporaries of one process for one target (e.g. an image index).
    """
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}" + (f"-{tag}" if tag != "" else ""))


def remove_stale_partials(folder: Path, suffix: str = "", why: str = "a killed process") -> list[Path]:
    """Delete the half-written files (:func:`partial_path`, kind ``partial``) killed processes left in ``folder``.

    Only files of that naming whose target ends with ``suffix`` and whose process is no longer running are removed;
    each is logged. Returns them.
    """
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = PARTIAL_RE.match(entry.name)
        if (match and match["kind"] == "partial" and match["name"].endswith(suffix) and entry.is_file()
                and not entry.is_symlink() and not pid_alive(int(match["pid"]))):
            entry.unlink(missing_ok=True)
            logger.warning("removed %s, left by %s (pid %s, no longer running)", entry, why, match["pid"])
            removed.append(entry)
    return removed


#: Folders whose dead partial files this process has removed (:func:`atomic_file` sweeps each folder once).
_SWEPT: set[str] = set()


def _sweep_once(folder: Path) -> None:
    """Remove the temporaries killed processes left in ``folder`` (a kill -9 between a write and its rename), once
    per folder and process: writing into a folder again cleans what an earlier, killed write left there."""
    key = os.path.abspath(folder)
    if key not in _SWEPT:
        _SWEPT.add(key)
        try:
            remove_stale_partials(folder)
        except OSError:
            pass  # (an unreadable folder: the write itself reports it)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, it is someone else's
        return True
    return True


# --------------------------------------------------------------------------------------------------
# checks before anything is written
# --------------------------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: Path, replace: bool = True) -> Iterator[Path]:
    """A temporary name beside ``path`` to write; on success the file takes ``path``'s name, on failure it is removed.

    Args:
        path: the file to create; missing parent folders are created.
        replace: replace an existing ``path`` (one rename). False: never replace one, also not one created meanwhile
            (a hard link, which fails if ``path`` exists; a check and a rename where links are not supported).

    Raises:
        FileExistsError: ``replace`` is False and ``path`` exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = partial_path(path)
    try:
        yield tmp
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no check-then-write race
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if path.exists() or path.is_symlink():
                    raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_file`: readers see the old or the new file."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def check_output_dir(out: Path, overwrite: bool, inputs: list[Path], flag: str = "--output-dir") -> None:
    """Refuse an output that cannot hold a data set, or that ``--overwrite`` must not replace.

    Args:
        out: the absolute target folder.
        overwrite: whether a non-empty ``out`` may be replaced (only if ``convert`` wrote it, see the module).
        inputs: files and folders the run reads; ``out`` must not hold them.
        flag: the flag named in messages.

    Raises:
        OutputError: naming ``out`` (and the file in its way).
    """
    for folder in [out, *out.parents]:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                problem = "exists and is not a folder" if folder == out else f"cannot be created: {folder} is a file"
                raise OutputError(out, problem, f"choose another {flag}")
            break
    if out.parent == out:
        raise OutputError(out, "is a file system root", f"choose a folder for {flag}")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise OutputError(out, "is not empty", f"choose an empty or new {flag}, or pass --overwrite")
    for path in inputs:
        path = path.expanduser().resolve()
        if path == out or out in path.parents:
            raise OutputError(out, f"holds the input {path}", f"choose a {flag} outside the inputs")
    home = " (your home folder)" if out == Path.home().resolve() else ""
    listed = _manifest_files(out, home)
    unrelated = _unlisted(out, listed)
    if unrelated:
        more = f" and {len(unrelated) - _SHOWN} more" if len(unrelated) > _SHOWN else ""
        shown = ", ".join(unrelated[:_SHOWN]) + more
        raise OutputError(
            out,
            f"holds files convert did not write ({shown}); --overwrite only replaces a data set convert wrote",
            f"move them away or choose another {flag}",
        )


def _manifest_files(out: Path, home: str) -> set[str]:
    """The files ``out``'s manifest lists; refuses a folder without a valid one."""
    path = out / MANIFEST
    fix = "--overwrite only replaces a data set folder convert wrote: choose a new --output-dir, or empty it yourself"
    if not path.is_file() or path.is_symlink():
        raise OutputError(out, f"was not written by convert{home} (it has no {MANIFEST})", fix)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OutputError(out, f"{MANIFEST} cannot be read ({err})", fix) from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or doc.get("tool") != _MANIFEST_TOOL or not all(isinstance(f, str) for f in files):
        raise OutputError(out, f"{MANIFEST} is not a convert manifest", fix)
    return set(files)


def _unlisted(out: Path, listed: set[str]) -> list[str]:
    """Files, links and other entries under ``out`` that neither the manifest nor the derived caches explain."""
    folders = {str(Path(f).parent.as_posix()) for f in listed}
    folders |= {p.as_posix() for f in listed for p in Path(f).parents}
    found = []
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        for name in sorted(dirs):
            rel = (rel_root / name).as_posix()
            if (Path(root) / name).is_symlink() or (rel not in folders and not _derived(rel)):
                found.append(rel + ("" if (Path(root) / name).is_symlink() else "/"))
                dirs.remove(name)  # not walked into: named as a whole
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if rel != MANIFEST and rel not in listed and not _derived(rel):
                found.append(rel)
    return sorted(found)


def _derived(rel: str) -> bool:
    return any(pattern.match(rel) for pattern in _DERIVED)


# --------------------------------------------------------------------------------------------------
# staging and the swap
# --------------------------------------------------------------------------------------------------


def remove_stale(out: Path) -> None:
    """Clean up after convert runs that were killed while writing ``out`` (their process is gone).

    A stale ``.convert-old-`` folder while ``out`` is missing is the old data set of a run killed between its two
    renames: it is put back. Every other stale staging folder is removed. Each action is logged.
    """
    parent = out.parent
    if not parent.is_dir():
        return
    stale = []
    for entry in parent.iterdir():
        match = PARTIAL_RE.match(entry.name)
        if (match and match["name"] == out.name and match["kind"] in ("convert-staging", "convert-old")
                and not match["tag"] and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(match["pid"]))):
            stale.append((match["kind"] != "convert-old", entry, match["pid"]))  # "old" folders first
    for is_staging, entry, pid in sorted(stale):
        if not is_staging and not out.exists():
            os.replace(entry, out)
            logger.warning("restored %s from %s (convert pid %s was killed while replacing it)", out, entry.name, pid)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning("removed %s, left by a killed convert (pid %s, no longer running)", entry, pid)
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.partial$")  # mkdtemp names of older versions
    for entry in parent.iterdir():
        if legacy.match(entry.name) and entry.is_dir():
            logger.warning("%s looks left by a killed convert of an older version; remove it if no convert runs", entry)


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` to build the data set in; removed (with parents it made) on failure.

    Call :func:`remove_stale` (and :func:`check_output_dir`) before.
    """
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()][::-1]
    for p in created:
        p.mkdir()
    tmp = partial_path(out, "convert-staging")
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid: a folder of an earlier process that had it
    try:
        tmp.mkdir()
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:  # something else was put there meanwhile
                pass
        raise


def write_manifest(tmp: Path, source: Path) -> None:
    """List every file under ``tmp`` in :data:`MANIFEST` (written last: a folder with it is complete)."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    doc = {"tool": _MANIFEST_TOOL, "source": str(source), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(doc, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")


def swap_into_place(tmp: Path, out: Path) -> None:
    """Make the complete folder ``tmp`` the folder ``out`` (see the module docstring); ``tmp`` is gone after."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # a rename, also over an empty folder
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the old set
        return
    old = partial_path(out, "convert-old")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_failure_cause(folder: Path) -> str | None:
    """Why files cannot be written into ``folder``, when it can be told after a library hid the ``OSError`` (torch's
    zip writer): a file-size limit (``ulimit -f``) or a full disk; None otherwise."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return f"File too large: this process may write files of at most {soft:,} bytes (ulimit -f)"
    except (ImportError, OSError, ValueError):
        pass
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return f"No space left on device ({free / 2**20:.0f} MiB free)" if free < 64 << 20 else None


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


