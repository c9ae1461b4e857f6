"""cellseg_pl: train, fine-tune and deploy YOLOv8-seg cell segmentation models with PyTorch Lightning."""

__version__ = "0.1.0"
