"""A standalone semi-supervised segmentation trainer: labeled images + filtered pseudo-labels
(Stage I), then the model's own predictions (Stage II, self-reliance).

Reads a manifest and pseudo-label PNGs only. ``python -m train --help`` lists the commands;
:class:`train.trainer.Trainer` runs a training (one file per concern beside it: ``steps``,
``schedule``, ``losses``, ``augment``, ``data``, ``distributed``, ``evaluation``,
``run_folder``, ``checkpoint``, ``plots``, ``models``);
:func:`train.inference.load_checkpoint_model` turns a checkpoint into a ready model.
"""
