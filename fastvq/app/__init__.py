"""The training application built on the fastvq library: the ``fastvq`` command line
(:mod:`~fastvq.app.cli`), the demo, the training stages (:mod:`~fastvq.app.recipes`), the IDX
dataset reader, metrics, figures, the training loop and its checkpoint store.

The library (every other module of ``fastvq``) never imports this package; this package imports
the library like any user would. Importing ``fastvq.app`` loads nothing: import its modules.
"""
