"""``python -m saef`` is the ``saef`` command."""

import sys

from .app.cli import main

sys.exit(main())
