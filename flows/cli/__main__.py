"""``python -m flows.cli``: the ``obliviate`` command line, for Ray jobs that run without the console script.

Python imports :mod:`flows.cli` (its package) before this line, so a Ctrl-C in that time is Python's own
KeyboardInterrupt; from here on Ctrl-C and SIGTERM end the command as the console script's do (:mod:`flows._entry`).
"""

from flows._entry import run

run()
