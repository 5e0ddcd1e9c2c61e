"""``obliviate target train|serve``: make a target checkpoint to audit, or serve one over HTTP."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from flows.cli._store import StoreOption, local_path, prepare_store, store_url
from flows.cli._types import Args, choices, dataset, flag, integer, new_app, option, parsed, usage_error
from flows.cli._types import seed as seed_type
from flows.runtime import writable_folder
from obliviate.errors import ConfigError

if TYPE_CHECKING:
    from flows.model_server import TargetServer

#: What `--arch` takes: the audit's small digit classifiers, those steal's substitutes take. build_model's resnet18
#: was taken too and ran past 120 s on 2,000 images, while the start line quoted LeNet-5's 9 s.
ARCHITECTURES = ("lenet5", "c3f2")


def _architecture(text: str) -> str:
    if text not in ARCHITECTURES:
        raise typer.BadParameter(
            f"a target is lenet5 or c3f2, the architectures steal's substitutes take; got {text!r}. Give --arch c3f2, "
            "or leave --arch out for lenet5."
        )
    return text


def train_command(
    ctx: typer.Context,
    data: Annotated[
        str, option("--data", parser=dataset, help="mnist5k (default), digits, an .npz file or a dataset folder")
    ] = "mnist5k",
    out: Annotated[str, option("--out", help="checkpoint path (default runs/target.pt)")] = "runs/target.pt",
    arch: Annotated[
        str,
        option(
            "--arch",
            parser=_architecture,
            metavar=choices(*ARCHITECTURES),
            help="lenet5 (default) or c3f2, the architectures steal's substitutes take",
        ),
    ] = "lenet5",
    train_size: Annotated[
        int | None,
        option(
            "--train-size",
            parser=integer,
            help="training images (stratified; default 2000, the bench's, or a third of a dataset smaller than 5,000 "
            "images)",
        ),
    ] = None,
    steps: Annotated[int, option("--steps", parser=integer, help="Adam steps, batch 64 (default 1500)")] = 1500,
    seed: Annotated[
        int,
        option(
            "--seed",
            parser=seed_type,
            help="seed of the split (draw_split: `steal` then uses the bench's split SEED), weights and batches "
            "(default 0)",
        ),
    ] = 0,
    overwrite: Annotated[bool, flag("--overwrite", help="replace the checkpoint if --out already holds one")] = False,
) -> Args:
    return parsed(ctx, run_train, action="train")


def serve_command(
    ctx: typer.Context,
    checkpoint: Annotated[str | None, option("--checkpoint", help="path written by `obliviate target train`")] = None,
    run: Annotated[
        str | None,
        option("--run", help="serve what this run of --store serves now (interim versions, sharded runs; issue 11)"),
    ] = None,
    store: StoreOption = None,
    host: Annotated[
        str, option("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    ] = "127.0.0.1",
    port: Annotated[int, option("--port", parser=integer, help="port to listen on (default 8000)")] = 8000,
    probabilities: Annotated[bool, flag("--probabilities", help="also answer probability requests")] = False,
) -> Args:
    if checkpoint is None and run is None:
        raise usage_error(ctx, "one of the options --checkpoint --run is required")
    if checkpoint is not None and run is not None:
        raise usage_error(ctx, "option --run not allowed with option --checkpoint")
    return parsed(ctx, run_serve, action="serve")


def register(app: typer.Typer) -> None:
    actions = new_app(subcommand_metavar="ACTION")
    help = "train a classifier on part of a dataset and save it"
    actions.command("train", help=help, short_help=help)(train_command)
    help = "serve a checkpoint at http://HOST:PORT/predict (label-only by default)"
    actions.command("serve", help=help, short_help=help)(serve_command)
    help = "train a target checkpoint or serve one over HTTP"
    app.add_typer(actions, name="target", help=help, short_help=help)


def run_train(args: Args) -> int:
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import default_target_train_size, train_target
    from obliviate.extraction.substitute import TrainConfig, accuracy, predict_labels
    from obliviate.extraction.target import save_checkpoint

    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (Adam steps); got {args.steps}. The default is 1500.")
    local_path(
        args.out,
        flag="--out",
        what="the checkpoint's file",
        instead="Train to a local path (default runs/target.pt) and copy it to object storage afterwards.",
    )
    data = load_dataset(args.data)
    train_size = default_target_train_size(len(data)) if args.train_size is None else args.train_size
    if not 1 <= train_size < len(data):
        raise ConfigError(
            f"--train-size must leave images of {data.name} ({len(data)}) for the attacker's pool and test set, so "
            f"it must be in 1..{len(data) - 1}; got {train_size}. The default takes "
            f"{default_target_train_size(len(data))} here."
        )
    # Last of the checks, as it creates the folder; before training, which takes a while.
    created = _missing_folders(Path(args.out).parent)
    out = _writable_checkpoint_path(args.out, overwrite=args.overwrite)
    print(
        f"target train: training {args.arch} on {train_size:,} images of {data.name}, {args.steps} Adam steps "
        f"({TRAIN_SECONDS_NOTES[args.arch]}) -> {out}",
        file=sys.stderr,
        flush=True,
    )
    model, meta = train_target(
        data, train_size=train_size, config=TrainConfig(arch=args.arch, steps=args.steps), seed=args.seed
    )
    try:
        save_checkpoint(out, model=model, arch=args.arch, meta=meta)
    except OSError:
        # The checkpoint is not there, so neither are the folders made for it (a full disk left an empty one).
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    # Its accuracy on every image it did not train on: what an audit's agreement will be measured beside.
    rest = np.setdiff1d(np.arange(len(data)), meta["train_indices"])
    rest_accuracy = accuracy(
        predicted=predict_labels(model, images=data.images[rest], levels=data.levels), truth=data.labels[rest]
    )
    print(
        f"target {out}: {args.arch} trained on {train_size:,} images of {data.name} ({args.steps} steps); accuracy "
        f"{100 * rest_accuracy:.1f} % on the other {len(rest):,} images. Audit it with `obliviate steal --target {out} "
        f"--pool {args.data}`."
    )
    print(
        json.dumps(
            {
                "checkpoint": str(out),
                "arch": args.arch,
                "train_size": train_size,
                "dataset": data.name,
                "accuracy_on_the_rest": rest_accuracy,
            }
        )
    )
    return 0


#: How long training takes, said before it starts: `time obliviate target train --data mnist5k` (2,000 images,
#: 1,500 steps) took 8.6 s on the idle 2-core machine of 2026-12-01, 12 s in bench/extraction_audit_e2e.py, and 39.5 s
#: wall (40 s CPU: torch's two threads wait on each other while a core is taken) at load 3 on 2026-12-02. C3F2's
#: convolutions cost more: `--arch c3f2` took 385 s where `--arch lenet5` took 43 s, one after the other at load 6
#: on the same machine (2026-12-02).
TRAIN_SECONDS_NOTES = {
    "lenet5": "1,500 took 9 s end to end on an idle 2-core machine; other work on its cores slows it, 40 s at load 3",
    "c3f2": "1,500 took 385 s end to end on a 2-core machine at load 6, where lenet5 took 43 s: about 9 times as long",
}


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first (those that creating it makes)."""
    missing = []
    for part in (folder, *folder.parents):
        if part.exists():
            break
        missing.append(part)
    return missing


def _writable_checkpoint_path(out: str, *, overwrite: bool) -> Path:
    path = Path(out)
    if path.is_dir():
        raise ConfigError(
            f"--out is the checkpoint's file path, but {out!r} is a folder; add a file name like target.pt."
        )
    # A rerun with other options replaced a trained target (and the split steal reads from it) without a word.
    if path.exists() and not overwrite:
        raise ConfigError(
            f"--out {out!r} already exists; target train does not replace a file unless told to. Add --overwrite to "
            "replace it, or give another --out."
        )
    # The nearest existing folder above: a file there (/dev/null/x.pt) cannot hold a folder.
    above = next(p for p in path.parents if p.exists() or p == p.parent)
    if not above.is_dir():
        raise ConfigError(
            f"cannot create the folder of --out {str(above)!r}: it is a file, not a folder; choose another path."
        )
    writable_folder(path.parent, what="the folder of --out")
    return path


def _listening(make_server: Callable[[], TargetServer], *, host: str, port: int) -> TargetServer:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0 lets the system pick a free one); got {port}.")
    try:
        return make_server()
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port, or 0 for a free one."
        ) from err


def run_serve(args: Args) -> int:
    from flows.model_server import RunBackend, TargetServer
    from obliviate.extraction.target import load_checkpoint

    if args.run:
        backend = RunBackend(prepare_store(store_url(args), write=False), args.run)
        server = _listening(
            lambda: TargetServer(
                backend=backend,
                host=args.host,
                port=args.port,
                info=backend.spec_info,
                allow_probabilities=args.probabilities,
            ),
            host=args.host,
            port=args.port,
        )
        return _serve(server, f"serving run {args.run} ({backend.rule}) at {server.url} (Ctrl-C stops)")
    if not Path(args.checkpoint).exists():
        raise ConfigError(f"checkpoint {args.checkpoint!r} does not exist; make one with `obliviate target train`.")
    model, meta = load_checkpoint(args.checkpoint)
    server = _listening(
        lambda: TargetServer(
            model,
            host=args.host,
            port=args.port,
            levels=int(meta.get("levels", 256)),
            info=meta,
            allow_probabilities=args.probabilities,
        ),
        host=args.host,
        port=args.port,
    )
    return _serve(server, f"serving {args.checkpoint} at {server.url} (Ctrl-C stops)")


def _serve(server, serving: str) -> int:
    from flows.model_server import ignore_stop_signals

    try:  # a Ctrl-C right after the "serving" line is a stop too (it said "interrupted", exit 130)
        with _stop_signals_stop_once():
            print(serving, flush=True)
            server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped (as `obliviate ui`): exit 0, said below
        ignore_stop_signals()  # done already by the stop's handler, unless the signal came before it was installed
    finally:
        server.httpd.server_close()
    print(f"obliviate target serve: stopped; {server.url} no longer answers.", file=sys.stderr, flush=True)
    return 0


@contextlib.contextmanager
def _stop_signals_stop_once() -> Iterator[None]:
    """While serving, the first Ctrl-C or SIGTERM stops the server, and every later one is ignored.

    Further stop signals were ignored only once the first one's KeyboardInterrupt had come out of
    ``serve_forever`` into ``_serve``'s ``except``: a second one (GNU ``timeout`` and a terminal's Ctrl-C
    on the process group send two) landing on the way there ended the command with "interrupted" and 130.
    Here the signal's own handler ignores them before it raises, so no bytecode of the way out is exposed.
    A signal landing inside the handler itself, before the ignoring, runs the handler again: the same stop.
    A signal the caller ignores (SIGINT in a job a script started in the background) stays ignored; outside
    the main thread nothing changes (Python runs signal handlers only there). Any other way out puts the handlers back.
    """
    import signal
    import threading

    from flows import model_server

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        model_server.ignore_stop_signals()
        raise KeyboardInterrupt

    found = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    taken = [signum for signum, handler in found.items() if handler != signal.SIG_IGN]
    for signum in taken:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in taken:
            if signal.getsignal(signum) is stop and found[signum] is not None:  # no stop came (a stop ignores both)
                signal.signal(signum, found[signum])
