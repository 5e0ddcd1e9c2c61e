"""A SIGTERM that lands while a pass waits on Ray stops the pass; it is not recorded as the run's failure.

Prefect's SIGTERM handler raises its ``TerminationSignal`` inside Ray's C wait, which comes out of
``ray.get`` as ``SystemError: <built-in method __new__ of type object at 0x...> returned a result
with an exception set``. The fan-out recorded that as the run's error: the request used up an
attempt, ``forget --status`` showed the SystemError as its reason (a flipped checkpoint's
``CorruptObject`` and its mend were never received), and the pass went on as if nothing had
stopped it. Now the signal itself leaves the fan-out, as a SIGTERM anywhere else in the pass does.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest


def test_sigterm_in_the_wait_on_ray_stops_the_fan_out(tmp_path):
    from prefect.exceptions import TerminationSignal
    from prefect.utilities.engine import _prefect_sigterm_handler

    from flows.runtime import ensure_ray
    from flows.unlearn import fan_out_unlearning

    ensure_ray(num_cpus=2)
    url = f"file://{tmp_path / 'store'}"
    previous = signal.signal(signal.SIGTERM, _prefect_sigterm_handler)  # as inside a flow run
    # the pooled worker starts now (a process and the torch import: seconds), so ray.get is waiting
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(TerminationSignal):
            results, _ = fan_out_unlearning(url, {"run-a": {"del-x": [1]}}, policy="exact", verify=False, workers=1)
            pytest.fail(f"the fan-out went on after the SIGTERM and recorded {results}")
    finally:
        timer.join()
        signal.signal(signal.SIGTERM, previous)
