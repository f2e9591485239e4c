"""Private swarms: a libp2p pre-shared key (PSK) that every peer of the swarm must hold.

The file has go-libp2p's swarm.key format (IPFS private networks use the same)::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits: 32 random bytes>

py-libp2p encrypts every connection with it (Salsa20 with an 8-byte nonce) before anything else, so
a peer without the key, or with another one, cannot even finish the handshake. Only the file format
is go-libp2p's: its private networks use XSalsa20 with a 24-byte nonce, so a swarm key joins
py-libp2p peers (swarm-node) only, not go-libp2p or IPFS nodes. The key protects who may connect;
the Noise handshake inside it still authenticates each peer.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from swarm_node.errors import ConfigError
from swarm_node.node.net.identity import check_private_file

HEADER = "/key/swarm/psk/1.0.0/"
ENCODING = "/base16/"
MAX_FILE = 1024  # bytes; a key file is ~90


def load_swarm_key(path: Path) -> str:
    """The key in ``path`` as the 64 hex digits new_host(psk=...) takes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise ConfigError(
                f"'--swarm-key' {path} must be a key file of <= {MAX_FILE} bytes, got {size}"
            )
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'--swarm-key' {path} cannot be read: {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines[:2] != [HEADER, ENCODING] or len(lines) != 3:
        raise ConfigError(
            f"'--swarm-key' {path} must hold three lines, {HEADER!r}, {ENCODING!r} and 64 hex digits "
            f"(make one with `swarm-node keygen --swarm-key FILE`), got {len(lines)} line(s)"
        )
    key = lines[2].lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ConfigError(
            f"'--swarm-key' {path}: the key must be 64 hex digits (32 bytes), got {len(key)} characters"
        )
    check_private_file(path, "--swarm-key", "join this private swarm")
    return key


def write_swarm_key(path: Path) -> None:
    """A new random key file (mode 0600); refuses to overwrite one."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"'--swarm-key' {path} exists already; remove it first to make a new key")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{HEADER}\n{ENCODING}\n{secrets.token_hex(32)}\n")
