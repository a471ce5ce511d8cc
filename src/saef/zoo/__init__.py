"""Datasets (:mod:`.datasets`, one module per source behind a registry) and models (:mod:`.models`): what
``saef train`` trains on. Imports nothing else of saef but :mod:`saef.files`."""
