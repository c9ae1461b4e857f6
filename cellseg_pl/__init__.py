"""cellseg_pl: train, fine-tune and deploy YOLOv8-seg cell segmentation models with PyTorch Lightning."""

import os as _os

__version__ = "0.1.0"

#: ``OMP_NUM_THREADS`` as the user's environment set it, read before anything imports Ultralytics (whose import
#: sets it to 1 when unset); CPU training honours it (:meth:`cellseg_pl.data.datamodule.CellSegDataModule.setup`).
USER_OMP_NUM_THREADS = _os.environ.get("OMP_NUM_THREADS")
