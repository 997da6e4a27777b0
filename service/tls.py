"""TLS files read with Python's ssl before gRPC or redis-py use them: they say only that a handshake or
a bind failed, ssl says which file is wrong and why."""

from __future__ import annotations

import ssl
from pathlib import Path


def load_key_pair(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """A certificate chain and its private key into `context`. OSError for a file that cannot be read,
    ssl.SSLError for a pair that does not match, ValueError for an encrypted key (none is prompted for)."""
    context.load_cert_chain(str(cert), str(key), password=_encrypted)


def _encrypted() -> str:
    raise ValueError("the private key is encrypted: give an unencrypted one")
