"""``--help`` at once: the text of a plain ``<command> --help`` is kept after its first run and printed from there.

A command's help is generated from the code: ``fit``'s by LightningCLI from the LightningModule, the data module and
Lightning's ``Trainer`` (importing Lightning alone takes seconds: it loads torchmetrics, torchvision and scipy), a
tool's from its function, whose module imports torch. The text only changes when that code does, so it is kept in
``$XDG_CACHE_HOME/cellseg_pl/help/`` (default ``~/.cache``) under a key made of:

* the command line (only ``<command> --help`` / ``-h`` with no other argument: a ``--config`` changes the defaults);
* the program name (``prog``, and the script's as LightningCLI prints it) and the terminal width (argparse wraps to ``COLUMNS``);
* Python's version and those of Lightning, jsonargparse, torch, Ultralytics and cellseg_pl;
* the path, size and modification time of every ``.py`` file of the package (an edit makes a new key).

Nothing is cached when the help fails; a cache folder that cannot be written is skipped without a word (the help is
printed either way). ``CELLSEG_PL_NO_HELP_CACHE=1`` turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from cellseg_pl.files import write_atomic

HELP_FLAGS = ("-h", "--help")
_PACKAGES = ("lightning", "jsonargparse", "torch", "ultralytics", "cellseg_pl")


def is_plain_help(argv: list[str]) -> bool:
    """``<command> --help`` or ``cycle <sub> --help``, nothing else."""
    words = argv[:2] if argv[:1] == ["cycle"] else argv[:1]
    return len(argv) == len(words) + 1 and bool(words) and argv[-1] in HELP_FLAGS


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cellseg_pl" / "help"


def cache_key(argv: list[str], prog: str | None) -> str:
    """What the help text depends on (module docstring), hashed."""
    h = hashlib.sha256()
    width = shutil.get_terminal_size().columns
    h.update(repr((argv, prog, os.path.basename(sys.argv[0]), width, sys.version)).encode())
    for name in _PACKAGES:
        try:
            h.update(f"{name}={metadata.version(name)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=-;".encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(package)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def cached_help(argv: list[str], prog: str | None, produce: Callable[[], int]) -> int:
    """Print ``argv``'s help from the cache, or run ``produce`` (which prints it; may raise ``SystemExit``), print
    its text and keep it when it succeeded. Returns the exit code."""
    if os.environ.get("CELLSEG_PL_NO_HELP_CACHE", "") not in ("", "0"):
        return _run(produce)
    path = cache_dir() / f"{'-'.join(argv[:-1]).replace(' ', '_')}-{cache_key(argv, prog)}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    if text:
        sys.stdout.write(text)
        return 0
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = _run(produce)
    text = buffer.getvalue()
    sys.stdout.write(text)
    if code == 0 and text:
        _keep(path, text)
    return code


def _run(produce: Callable[[], int]) -> int:
    try:
        return produce()
    except SystemExit as stop:  # argparse and LightningCLI exit after printing the help
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)


def _keep(path: Path, text: str) -> None:
    """Write atomically; an unwritable cache is skipped (the help is printed anyway)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.txt"):
            stale.unlink(missing_ok=True)  # the same command's help for older code
        write_atomic(path, text)
    except OSError:
        pass
