"""Shared fixtures: tiny synthetic YOLO-seg data sets and a guard that fails any test touching the network."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with outbound connections and DNS look-ups refused: cellseg_pl must work offline."""

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    local = {"localhost", "127.0.0.1", "::1", "", None}

    def guarded_connect(sock, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family == socket.AF_UNIX or host in local:
            return real_connect(sock, address, *args, **kwargs)
        raise NetworkAccessError(f"test tried to reach the network: {address!r}")

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host in local:
            return real_getaddrinfo(host, *args, **kwargs)
        raise NetworkAccessError(f"test tried to resolve {host!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 12-image demo-style data set at 128 px (8 train, 4 val); returns its dataset.yaml."""
    from cellseg_pl.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    return make_demo_dataset(root, n_train=8, n_val=4, size=128, seed=1)


def fit_args(data_yaml: Path, project: Path, name: str = "run", epochs: int = 2, *extra: str) -> list[str]:
    """CLI arguments for a fast CPU fit on tiny data."""
    return [
        "fit",
        "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
        "--project", str(project),
        "--name", name,
        "--data.dataset", str(data_yaml),
        "--data.imgsz", "128",
        "--data.batch_size", "4",
        "--data.num_workers", "0",
        "--trainer.max_epochs", str(epochs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0",
        *extra,
    ]


@pytest.fixture(autouse=True)
def fresh_logging():
    """Keep logging handlers pointed at this test's stderr and drop the one ``main()`` adds afterwards.

    Lightning binds a stream handler to ``sys.stderr`` when first imported; under pytest that may be an earlier
    test's (closed) capture buffer.
    """
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.stream = sys.stderr  # not setStream(): it flushes the old, maybe closed, stream
    yield
    logging.getLogger("cellseg_pl").handlers.clear()
    # a test that builds a trainer under fake SLURM/DDP ranks leaves Lightning's global rank set: reset it
    if "lightning.pytorch" in sys.modules:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        rank_zero_only.rank = 0
