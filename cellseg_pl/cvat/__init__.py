"""CVAT's "COCO 1.0" exports in, YOLO-seg data sets out: the zip (:mod:`.archive`), its COCO JSON and masks
(:mod:`.coco`), the images it names (:mod:`.index`), the label lines (:mod:`.labels`), the conversion (:mod:`.convert`)
and its summary (:mod:`.report`)."""
