"""``obliviate target train|serve``: make a target checkpoint to audit, or serve one over HTTP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.cli._store import add_store_argument, prepare_store, store_url
from obliviate.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("target", help="train a target checkpoint or serve one over HTTP")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = actions.add_parser("train", help="train a classifier on part of a dataset and save it")
    train.add_argument("--data", default="mnist5k", help="mnist5k, digits, an .npz file or a dataset folder")
    train.add_argument("--out", default="runs/target.pt", help="checkpoint path (default runs/target.pt)")
    train.add_argument("--arch", default="lenet5", help="lenet5 (default) or c3f2")
    train.add_argument("--train-size", type=int, default=2000, help="training images (stratified; default 2000)")
    train.add_argument("--steps", type=int, default=1500, help="Adam steps, batch 64 (default 1500)")
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split (draw_split: `steal` then uses the bench's split SEED), weights and batches",
    )
    train.set_defaults(handler=run_train)

    serve = actions.add_parser("serve", help="serve a checkpoint at http://HOST:PORT/predict (label-only by default)")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="path written by `obliviate target train`")
    source.add_argument(
        "--run", help="serve what this run of --store serves now (interim versions, sharded runs; issue 11)"
    )
    add_store_argument(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--probabilities", action="store_true", help="also answer probability requests")
    serve.set_defaults(handler=run_serve)


def run_train(args: argparse.Namespace) -> int:
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import train_target
    from obliviate.extraction.substitute import TrainConfig
    from obliviate.extraction.target import save_checkpoint

    data = load_dataset(args.data)
    model, meta = train_target(
        data, train_size=args.train_size, config=TrainConfig(arch=args.arch, steps=args.steps), seed=args.seed
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, arch=args.arch, meta=meta)
    print(json.dumps({"checkpoint": str(out), "arch": args.arch, "train_size": args.train_size, "dataset": data.name}))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from flows.model_server import RunBackend, TargetServer
    from obliviate.extraction.target import load_checkpoint

    if args.run:
        backend = RunBackend(prepare_store(store_url(args), write=False), args.run)
        server = TargetServer(
            backend=backend,
            host=args.host,
            port=args.port,
            info=backend.spec_info,
            allow_probabilities=args.probabilities,
        )
        print(f"serving run {args.run} ({backend.rule}) at {server.url} (Ctrl-C stops)", flush=True)
        return _serve(server)
    if not Path(args.checkpoint).exists():
        raise ConfigError(f"checkpoint {args.checkpoint!r} does not exist; make one with `obliviate target train`.")
    model, meta = load_checkpoint(args.checkpoint)
    server = TargetServer(
        model,
        host=args.host,
        port=args.port,
        levels=int(meta.get("levels", 256)),
        info=meta,
        allow_probabilities=args.probabilities,
    )
    print(f"serving {args.checkpoint} at {server.url} (Ctrl-C stops)", flush=True)
    return _serve(server)


def _serve(server) -> int:
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
