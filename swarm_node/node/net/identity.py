"""Peer identities: an Ed25519 key pair, optionally kept in a file so the peer id survives restarts."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p import generate_new_ed25519_identity
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key

from swarm_node.errors import ConfigError

MAX_KEY_FILE = 4096  # bytes; an Ed25519 key in libp2p's protobuf form is ~70


def check_private_file(path: Path, flag: str, what: str) -> None:
    """Refuse a key file that other users may read or write (``what``: what they could then do)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"{flag!r} {path} must be readable by its owner only (mode 0600), got mode {mode:04o}: "
            f"anyone on this machine could {what}; run `chmod 600 {path}`"
        )


def load_or_create_identity(path: Path | None) -> KeyPair:
    """The key pair in ``path`` (created with mode 0600 if missing), or a fresh one if ``path`` is None."""
    if path is None:
        return generate_new_ed25519_identity()
    path = Path(path)
    if path.exists():
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise ConfigError(
                f"'--identity' {path} must be a key file of <= {MAX_KEY_FILE} bytes, got {size}"
            )
        try:
            private = deserialize_private_key(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 (protobuf/crypto raise several types on a bad file)
            raise ConfigError(
                f"'--identity' {path} is not a libp2p private key file: {exc}"
            ) from None
        check_private_file(path, "--identity", "take this peer's id")
        return KeyPair(private, private.get_public_key())
    key_pair = generate_new_ed25519_identity()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pair.private_key.serialize())
    os.replace(tmp, path)
    return key_pair
