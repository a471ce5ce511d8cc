"""``python -m saef`` is the ``saef`` command."""

import sys

from .cli import main

sys.exit(main())
