"""Shared fixtures: tiny synthetic YOLO-seg data sets and a guard that fails any test touching the network."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
# every --help is generated afresh in the tests (tests/test_cli.py turns the cache on where it tests it)
os.environ["CELLSEG_PL_NO_HELP_CACHE"] = "1"


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
    from cellseg_pl.data.demo import make_demo_dataset

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


def huge_png(width: int = 33000, height: int = 33000) -> bytes:
    """A PNG whose header says ``width`` x ``height`` px, 8-bit gray (only the first rows have data): OpenCV checks the
    size in the header before decoding, so a few hundred bytes take the path of an image over its 2^30 px limit."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def calibrate_batchnorm(ckpt_path: Path, images: list[Path]) -> None:
    """Give a 1-epoch checkpoint's EMA weights BatchNorm statistics of the data.

    After one epoch the running statistics still lag far behind the weights, and the network answers every image
    with the same near-tied full-image boxes: an equality test on such output hangs on how NMS breaks exact ties.
    Recomputed statistics make the detections depend on the image, as a trained model's do.
    """
    import torch

    from cellseg_pl.data.images import read_image
    from cellseg_pl.yolo.network import load_weights

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    net, _, _ = load_weights(ckpt_path)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    x = torch.stack([torch.from_numpy(read_image(p)).permute(2, 0, 1).float() / 255 for p in images])
    net.train()
    with torch.no_grad():
        net(x)
    for k, v in net.state_dict().items():
        checkpoint["state_dict"][f"ema.module.{k}"] = v
    torch.save(checkpoint, ckpt_path)


def mask_to_rle(mask: np.ndarray) -> dict:
    """A ``(H, W)`` mask as compressed COCO RLE with a JSON-ready ``str`` ``counts`` (what other tools export)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
