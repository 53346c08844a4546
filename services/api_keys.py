"""API keys: configured as hashes, checked in constant time, each with a name that owns its jobs.

Keys are random tokens (``drk_`` + 32 bytes, URL-safe), so a plain SHA-256 is the right hash: there is no
password to brute-force, and hashing lets the configuration (env, files, Kubernetes secrets) never hold a
usable key. ``python -m services.api_keys NAME`` mints one and prints the line to configure.

Configuration lines look like ``NAME:sha256:HEX`` — comma-separated in ``DARKROOM_API_KEYS``, one per line
in ``DARKROOM_API_KEYS_FILE`` (``#`` comments allowed).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENTRY = re.compile(r"(?P<name>[^:\s]+):sha256:(?P<digest>[0-9a-fA-F]{64})")


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key() -> str:
    return "drk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRing:
    """Name → SHA-256 of the key. ``verify`` compares against every entry, so timing leaks nothing."""

    digests: tuple[tuple[str, bytes], ...]

    @classmethod
    def parse(cls, entries: list[str]) -> KeyRing:
        parsed: list[tuple[str, bytes]] = []
        for raw in entries:
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            match = _ENTRY.fullmatch(entry)
            if not match or not _NAME.fullmatch(match["name"]):
                shown = entry.split(":", 1)[0]
                raise ValueError(f"API key entry for {shown!r} is not NAME:sha256:<64 hex digits>")
            if any(name == match["name"] for name, _ in parsed):
                raise ValueError(f"API key name {match['name']!r} is configured twice")
            parsed.append((match["name"], bytes.fromhex(match["digest"])))
        return cls(tuple(parsed))

    @classmethod
    def load(cls, inline: str | None, file: Path | None) -> KeyRing:
        entries = (inline or "").split(",")
        if file is not None:
            entries += file.read_text().splitlines()
        return cls.parse(entries)

    def __len__(self) -> int:
        return len(self.digests)

    def verify(self, token: str) -> str | None:
        """The key's name, or None. Every entry is compared (constant time per entry, no early exit)."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for name, digest in self.digests:
            if hmac.compare_digest(presented, digest):
                found = name
        return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not _NAME.fullmatch(args[0]):
        print("usage: python -m services.api_keys NAME   (NAME: letters, digits, _ . -)", file=sys.stderr)
        return 2
    token = new_key()
    print(f"key (give to the client, shown once): {token}")
    print(f"config line (DARKROOM_API_KEYS or the keys file): {args[0]}:sha256:{hash_key(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
