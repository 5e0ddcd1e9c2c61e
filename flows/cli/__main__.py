"""``python -m flows.cli``: the ``obliviate`` command line, for Ray jobs that run without the console script."""

import sys

from flows.cli import main

sys.exit(main())
