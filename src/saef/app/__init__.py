"""The application: the run configuration, the training loop, checkpoints, records, plots, the command
line (whose ``reproduce`` verb runs :mod:`saef.studies`), and the ``torch.optim``-style facade. It reaches
the backends only through :mod:`saef.backends.registry` and never asks which backend or rule runs.
"""
