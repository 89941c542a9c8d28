"""``python -m envcrate.cli``: the same as ``envcrate``."""

import sys

from . import main

sys.exit(main())
