"""``python -m mmdit_probe ...`` = ``mmdit-probe ...``."""

import sys

from .cli import main

sys.exit(main())
