"""Training on Lightning: the command line (:mod:`.cli`, and ``yolo segment train``'s arguments in
:mod:`.yolo_args`), the run folder (:mod:`.run_dir`), the LightningModule (:mod:`.module`) and Ultralytics'
optimization recipe (:mod:`.recipe`), the callbacks (:mod:`.callbacks`), the pictures (:mod:`.plots`) and ``export``
to an Ultralytics ``.pt`` (:mod:`.export`)."""
