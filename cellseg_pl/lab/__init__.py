"""The lab's cycle: a lab folder with versioned models and their cards, a fixed test set, and the commands
``cycle init``, ``cycle next``, ``cycle learn`` and ``cycle status`` (:mod:`cellseg_pl.lab.cycle`)."""
