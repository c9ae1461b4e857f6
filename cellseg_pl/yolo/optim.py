"""Ultralytics' own optimizer, MuSGD (Muon + SGD), behind the door; :mod:`cellseg_pl.train.recipe` uses it."""

from __future__ import annotations


def musgd_class() -> type:
    """``ultralytics.optim.MuSGD``: Newton-Schulz orthogonalized momentum (Muon) plus SGD on groups with
    ``use_muon``, plain SGD on the others. Ultralytics 8.4 builds it as ``MuSGD(groups, muon=0.2, sgd=1.0)``."""
    from ultralytics.optim import MuSGD

    return MuSGD
