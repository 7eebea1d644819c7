"""``python -m frugaldiff`` (and ``torchrun -m frugaldiff``) run the CLI."""

import sys

from .cli import main

sys.exit(main())
