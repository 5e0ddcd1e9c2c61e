"""Object storage: the only layer that touches fsspec / s3fs.

One URL decides the backend (``file://`` by default, ``s3://`` for any S3 endpoint);
checkpoints, MI tiles, subsets, manifests and ledgers are written and read here.
"""
