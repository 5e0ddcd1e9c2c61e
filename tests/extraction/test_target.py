"""Budget enforcement, query counting and label-only answers of the black-box target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from obliviate.errors import ConfigError
from obliviate.extraction.target import (
    BudgetExceeded,
    LocalTorchBackend,
    OutputMode,
    Target,
    decode_images,
    encode_images,
    load_checkpoint,
    save_checkpoint,
)


def test_every_image_counts_and_the_budget_refuses_the_batch_that_would_pass_it(target_model, pool_images):
    target = Target(LocalTorchBackend(target_model), budget=10)
    target.query(pool_images[:4])
    target.query(pool_images[4:7])
    assert target.used == 7 and target.remaining == 3
    with pytest.raises(BudgetExceeded, match="budget is 10 images and 7 are used"):
        target.query(pool_images[7:11])
    # A refused batch is not answered and not counted, but it is logged.
    assert target.used == 7
    assert [r.size for r in target.log] == [4, 3, 4]
    assert [r.refused for r in target.log] == [False, False, True]
    assert [r.used_after for r in target.log] == [4, 7, 7]
    target.query(pool_images[7:10])
    assert target.used == 10
    with pytest.raises(BudgetExceeded):
        target.query(pool_images[:1])


def test_the_log_identifies_what_was_asked(target_model, pool_images):
    target = Target(LocalTorchBackend(target_model), budget=None)
    target.query(pool_images[:3])
    target.query(pool_images[:3])
    target.query(pool_images[3:6])
    digests = [r.digest for r in target.log]
    assert digests[0] == digests[1] != digests[2]


def test_label_only_target_answers_integer_labels_and_nothing_else(target_model, pool_images):
    target = Target(LocalTorchBackend(target_model), budget=50)
    answer = target.query(pool_images[:20])
    assert answer.dtype == np.int64 and answer.shape == (20,)
    with torch.no_grad():
        from obliviate.models import images_to_tensor

        expected = target_model(images_to_tensor(pool_images[:20])).argmax(1).numpy()
    np.testing.assert_array_equal(answer, expected)


def test_probabilities_only_behind_the_switch(target_model, pool_images):
    target = Target(LocalTorchBackend(target_model), budget=50, output="probabilities")
    probs = target.query(pool_images[:5])
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert target.used == 5
    empty = target.query(pool_images[:0])  # it answered (0, 0), so np.concatenate with a (k, 10) answer failed
    assert empty.shape == (0, 10) and empty.dtype == np.float32 and target.used == 5
    assert np.concatenate([probs, empty]).shape == (5, 10)
    assert Target(LocalTorchBackend(target_model), budget=5).query(pool_images[:0]).shape == (0,)


def test_a_backend_leaking_probabilities_is_caught_in_label_mode(pool_images):
    class Leaky:
        def predict(self, images, *, output):
            return np.full((len(images), 10), 0.1, np.float32)

    with pytest.raises(Exception, match="leaking probabilities"):
        Target(Leaky(), budget=5).query(pool_images[:2])


def test_bad_batches_and_budgets_are_rejected(target_model, pool_images):
    with pytest.raises(ConfigError, match="non-negative"):
        Target(LocalTorchBackend(target_model), budget=-1)
    target = Target(LocalTorchBackend(target_model), budget=5)
    with pytest.raises(ConfigError, match=r"\(n, H, W\)"):
        target.query(pool_images[0])
    with pytest.raises(ConfigError, match="uint8"):
        target.query(pool_images[:2].astype(np.float32))
    assert target.used == 0


def test_payload_round_trip(pool_images):
    np.testing.assert_array_equal(decode_images(encode_images(pool_images[:3])), pool_images[:3])
    with pytest.raises(ConfigError):
        decode_images({"shape": [2, 28, 28], "data": "AAAA"})


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path, target_model, pool_images):
    path = tmp_path / "t.pt"
    save_checkpoint(
        path, model=target_model, arch="lenet5", meta={"num_classes": 10, "image_size": 28, "train_indices": [1, 2]}
    )
    model, meta = load_checkpoint(path)
    assert meta["arch"] == "lenet5" and meta["train_indices"] == [1, 2]
    a = Target(LocalTorchBackend(target_model), budget=None, output=OutputMode.PROBABILITIES).query(pool_images[:8])
    b = Target(LocalTorchBackend(model), budget=None, output=OutputMode.PROBABILITIES).query(pool_images[:8])
    np.testing.assert_allclose(a, b, atol=1e-6)
    torch.save({"not": "a target"}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="not a target checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_file_that_is_not_a_sound_checkpoint_is_refused_in_words(tmp_path, target_model):
    """`target serve --checkpoint` on a text file or an edited checkpoint was a traceback (KeyError, RuntimeError)."""
    (tmp_path / "junk.pt").write_text("junk\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("junk.pt", "empty.pt"):
        with pytest.raises(ConfigError, match=rf"{name}' is not a readable torch checkpoint \(\w+Error"):
            load_checkpoint(tmp_path / name)
    whole = tmp_path / "whole.pt"
    save_checkpoint(whole, model=target_model, arch="lenet5", meta={})
    (tmp_path / "cut.pt").write_bytes(whole.read_bytes()[:2000])  # torch's error is a paragraph: it was cut mid-word
    with pytest.raises(ConfigError) as cut:
        load_checkpoint(tmp_path / "cut.pt")
    gist = str(cut.value).split("(", 1)[1].rsplit(")", 1)[0]
    assert len(gist) < 200 and (gist.endswith(" …") or "\n" not in gist), gist
    assert not gist.endswith("If yo"), gist
    path = tmp_path / "t.pt"
    save_checkpoint(
        path, model=target_model, arch="lenet5", meta={"num_classes": 7, "image_size": 28}
    )  # 10 outputs saved
    with pytest.raises(ConfigError, match="do not fit its architecture 'lenet5' with 7 classes and 28-pixel images"):
        load_checkpoint(path)


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path, target_model):
    path = tmp_path / "t.pt"
    save_checkpoint(path, model=target_model, arch="lenet5", meta={"num_classes": 10, "version": 1})
    with pytest.raises(Exception, match="pickle"):  # a value torch.save cannot write, found mid-save
        save_checkpoint(path, model=target_model, arch="lenet5", meta={"num_classes": 10, "hook": lambda: None})
    assert load_checkpoint(path)[1]["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.pt"]


def test_cli_target_refuses_an_unwritable_out_and_a_busy_port_in_words(tmp_path, capsys):
    import socket

    from flows.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # refused before training: the folder for --out cannot be made under a file
    assert main(["target", "train", "--out", str(blocker / "t.pt"), "--steps", "1"]) == 2
    assert "cannot create the folder of --out" in capsys.readouterr().err
    assert main(["target", "train", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "is a folder" in capsys.readouterr().err
    # /proc exists and even root may not create a file there: the probe file finds out before training
    assert main(["target", "train", "--out", "/proc/t.pt", "--steps", "1"]) == 2
    assert "cannot write into the folder of --out '/proc'" in capsys.readouterr().err
    checkpoint = tmp_path / "t.pt"
    assert main(["target", "train", "--out", str(checkpoint), "--steps", "1", "--train-size", "50"]) == 0
    capsys.readouterr()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["target", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert main(["target", "serve", "--checkpoint", str(checkpoint), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err

    # Ctrl-C is how a server stops (as `obliviate ui`): exit 0 and one sentence (it said nothing)
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "flows.cli", "target", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()  # it answers now
        time.sleep(0.5)
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=30)
    finally:
        server.kill()
    err = server.stderr.read()
    assert code == 0 and "obliviate target serve: stopped; http://127.0.0.1:" in err and "Traceback" not in err, err


def test_cli_target_train_defaults_to_a_third_of_a_small_dataset(tmp_path, capsys):
    """`target train --data digits` failed with its default 2,000 training images (digits has 1,797)."""
    from flows.cli import main
    from obliviate.extraction.target import load_checkpoint

    checkpoint = tmp_path / "digits.pt"
    assert main(["target", "train", "--data", "digits", "--out", str(checkpoint), "--steps", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["train_size"] == 599
    assert len(load_checkpoint(str(checkpoint))[1]["train_indices"]) == 599
    assert main(["target", "train", "--data", "digits", "--out", str(checkpoint), "--train-size", "1797"]) == 2
    assert "must be in 1..1796; got 1797. The default takes 599 here." in capsys.readouterr().err


def test_labels_outside_the_classes_the_audit_trains_are_refused(pool_images):
    """Labels past the substitute's classes reached training: IndexError 'Target 10 is out of bounds' in a Ray task."""
    from obliviate.extraction.target import TargetRequestError

    class Answering:
        def __init__(self, labels):
            self.labels = labels

        def predict(self, images, *, output):
            return np.asarray(self.labels)

    with pytest.raises(TargetRequestError, match=r"class numbers 0\.\.9 \(the target has 10 classes\); got 10"):
        Target(Answering([10, 1]), budget=5, num_classes=10).query(pool_images[:2])
    with pytest.raises(TargetRequestError, match=r"class numbers 0 or more; got -1"):  # classes unknown
        Target(Answering([-1, 1]), budget=5).query(pool_images[:2])
    with pytest.raises(TargetRequestError, match=r"answered 3 labels for 2 images"):
        Target(Answering([1, 1, 1]), budget=5).query(pool_images[:2])
    assert Target(Answering([9, 0]), budget=5, num_classes=10).query(pool_images[:2]).tolist() == [9, 0]


def test_cli_target_serve_on_a_host_this_machine_is_not_blames_the_host(tmp_path, target_model, capsys):
    """`--host 8.8.8.8` said 'cannot listen on 8.8.8.8:0 ... pick another --port': the port was never the problem."""
    from flows.cli import main

    checkpoint = tmp_path / "t.pt"
    save_checkpoint(checkpoint, model=target_model, arch="lenet5", meta={"num_classes": 10, "image_size": 28})
    for host in ("8.8.8.8", "no-such-host.invalid"):
        assert main(["target", "serve", "--checkpoint", str(checkpoint), "--host", host]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on host {host!r}: it is not an address of this machine" in err, err
        assert "--port" not in err and "Traceback" not in err
