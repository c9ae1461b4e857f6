"""The one door to Ultralytics: the network (build, load, save ``.pt``; :mod:`.network`), its loss (:mod:`.loss`) and
the head's postprocessing (:mod:`.postprocess`). No other module imports ``ultralytics``."""
