"""Deterministic splits by identity: an item's side is a hash of its key, never its position."""

from __future__ import annotations

import hashlib


def in_fraction(key: str, fraction: float, seed: int | str = 0) -> bool:
    """Whether `key` falls in the first `fraction` of [0, 1) under a seeded SHA-256 hash (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
