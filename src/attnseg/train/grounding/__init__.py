"""Grounded Diffusion's grounding module: its data, training, evaluation and command line.

:mod:`.data` builds the generated training and test items, :mod:`.train` trains it, :mod:`.evaluate` scores it
against the cross-attention baselines (Protocol I), :mod:`.export` writes a dataset labelled by it (Protocol II),
:mod:`.oracles` is a class-aware ShapesWorld oracle, :mod:`.command` is ``attnseg grounding``. The module itself is
:mod:`attnseg.methods.grounding`, its input :mod:`attnseg.diffusion.features`, and :mod:`attnseg.grounder` pairs a
trained module with its backbone (the Python API, ``attnseg generate --method grounding``).
"""
