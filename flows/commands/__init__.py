"""One module per ``obliviate`` sub-command; each exposes ``register(subparsers)``."""
