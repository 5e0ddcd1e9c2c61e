"""`obliviate target serve` says a client's reset and a repeated stop signal in words, never a traceback."""

from __future__ import annotations

import http.client
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from flows.model_server import TargetServer
from obliviate.extraction.target import save_checkpoint
from obliviate.models import build_model


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST (ConnectionResetError), not an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_resets_mid_request_costs_one_short_line_not_a_traceback(capfd):
    """A reset printed 'Exception occurred during processing of request ... ConnectionResetError: [Errno 104]'."""
    model = build_model("lenet5", image_size=28, seed=0).eval()
    with TargetServer(model, info={"image_size": 28}) as server:
        host, port = server.httpd.server_address[:2]
        partial = [
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le",  # reset while the headers are read
            b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{"shape": [1, 28',  # ... the body
        ]
        for sent in partial:
            client = socket.create_connection((host, port))
            client.sendall(sent)
            time.sleep(0.3)  # the server is blocked reading the rest
            _reset(client)
            time.sleep(0.3)
        check = http.client.HTTPConnection(host, port, timeout=10)
        check.request("GET", "/health")
        answer = check.getresponse()
        assert answer.status == 200  # still serving
        answer.read()  # closing with the body unread sends an RST: the server would report a third reset
        check.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= len(partial) and all("disconnected mid-request" in line for line in lines), err


def test_a_second_sigint_while_serve_stops_prints_no_traceback(tmp_path):
    """GNU timeout forwards SIGINT twice: the second interrupted torch's atexit callback ('Exception ignored')."""
    checkpoint = tmp_path / "t.pt"
    model = build_model("lenet5", image_size=28, seed=0)
    save_checkpoint(checkpoint, model=model, arch="lenet5", meta={"num_classes": 10, "image_size": 28})
    command = [sys.executable, "-m", "flows.cli", "target", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
        server.send_signal(signal.SIGINT)
        stop = server.stderr.readline()  # the stop sentence is printed: the process is on its way out
        assert "obliviate target serve: stopped" in stop, stop
        while server.poll() is None:  # further signals while it exits (a burst, so one lands in its exit handlers)
            server.send_signal(signal.SIGINT)
            time.sleep(0.002)
        code = server.wait(timeout=30)
    finally:
        server.kill()
    rest = server.stderr.read()
    assert code == 0, (code, stop + rest)
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest and "Exception ignored" not in rest, rest


# `python -m flows.cli`'s handling of Ctrl-C (flows._entry), then the command, then a second Ctrl-C sent by the
# process itself as soon as the command has returned: in the window the burst above hits only by chance.
_SIGINT_RIGHT_AFTER_THE_COMMAND = """
import os, signal, sys
import flows._entry
from flows.cli import main
code = main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGINT)
sys.exit(code)
"""


def _serve_then_sigint(tmp_path, script: str, *script_args: str) -> tuple[int, str]:
    """``target serve`` of a fresh LeNet-5 run through ``python -c script``, sent one SIGINT once serving: (code, stderr)."""
    checkpoint = tmp_path / "t.pt"
    model = build_model("lenet5", image_size=28, seed=0)
    save_checkpoint(checkpoint, model=model, arch="lenet5", meta={"num_classes": 10, "image_size": 28})
    words = ["target", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    command = [sys.executable, "-c", script, *script_args, *words]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
    finally:
        server.kill()
    return code, server.stderr.read()


def test_a_second_sigint_right_after_serve_returned_still_exits_0(tmp_path):
    """Serve ignores stop signals once stopped, but main() put the console script's handler back over that.

    A SIGINT between main()'s return and the clean-up at exit then ended the process with 130 and "obliviate:
    interrupted while exiting, after the command had ended." (the burst test above failed so in 3 of 30 runs on a loaded 2-CPU machine).
    """
    code, said = _serve_then_sigint(tmp_path, _SIGINT_RIGHT_AFTER_THE_COMMAND)
    assert "obliviate target serve: stopped" in said, said
    assert code == 0, (code, said)
    assert "interrupted" not in said and "Traceback" not in said, said


# `python -m flows.cli`'s handling of Ctrl-C, then the command; the first time serve comes to ignore further stop signals
# (flows.model_server.ignore_stop_signals), the process sends itself a second signal just before: the end of the way
# from serve_forever's KeyboardInterrupt to the ignoring, which a signal from outside hits only by chance.
_SECOND_SIGNAL_JUST_BEFORE_THE_IGNORING = """
import signal, sys
import flows._entry
from flows import model_server
from flows.cli import main

second = signal.Signals[sys.argv[1]]
ignore, sent = model_server.ignore_stop_signals, []

def ignore_after_a_second_signal():
    if not sent:
        sent.append(second)
        print(f"second signal {second.name} sent", file=sys.stderr, flush=True)
        signal.raise_signal(second)
    ignore()

model_server.ignore_stop_signals = ignore_after_a_second_signal
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_on_serves_way_out_of_serve_forever_still_exits_0(tmp_path, second):
    """Serve ignored further stop signals only once the first Ctrl-C's KeyboardInterrupt had reached its ``except``.

    A second SIGINT or SIGTERM on the way there ended the stop with "interrupted" (130) or "stopped by SIGTERM" (143).
    """
    code, said = _serve_then_sigint(tmp_path, _SECOND_SIGNAL_JUST_BEFORE_THE_IGNORING, second.name)
    assert f"second signal {second.name} sent" in said, said  # the window was hit
    assert "obliviate target serve: stopped;" in said, said
    assert code == 0, (code, said)
    assert "interrupted" not in said and "stopped by SIGTERM" not in said and "Traceback" not in said, said
