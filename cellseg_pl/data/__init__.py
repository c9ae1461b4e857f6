"""A YOLO-seg data set to batches: ``dataset.yaml`` and the samples (:mod:`.dataset`), image files (:mod:`.images`)
and label files (:mod:`.labels`), the check before training (:mod:`.scan`), augmentations (:mod:`.transforms`), the
image cache (:mod:`.cache`), the loaders (:mod:`.datamodule`) and the synthetic demo data (:mod:`.demo`)."""
