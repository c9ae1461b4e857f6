"""A trained model on new images: the inference settings (:mod:`.options`), the engine with tiling
(:mod:`.engine`), ``predict`` to COCO JSON for CVAT (:mod:`.predict`), overlays (:mod:`.overlay`) and ``select``
for active learning (:mod:`.select`)."""
