"""``python -m flows.cli``: the ``obliviate`` command line, for Ray jobs that run without the console script."""

from flows.cli import run

run()
