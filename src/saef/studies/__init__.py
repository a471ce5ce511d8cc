"""The paper's experiments and the studies built on it (``saef reproduce``): sets of ``saef train`` runs
(:mod:`.runs`), their plans and reports (:mod:`.reproduce`, :mod:`.baselines`, :mod:`.adam`).

A layer above the application: a study runs ``saef train`` in child processes and reads what the runs
recorded with :mod:`saef.app.records` and :mod:`saef.app.plots`; nothing in the application imports it
but the command line, which dispatches the ``reproduce`` verb here.
"""
