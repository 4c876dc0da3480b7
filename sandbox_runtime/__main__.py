"""``python -m sandbox_runtime``: the command line."""

import sys

from .cli import main

sys.exit(main())
