"""Stable digests: what cache keys and corpus fingerprints are made of (no heavy imports, so the
tokenizers can use them without the datasets library)."""

import hashlib
import json


def digest(*parts, size: int = 16) -> str:
    """Hex digest of JSON-serializable parts (dict keys sorted), stable across runs and machines."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()
