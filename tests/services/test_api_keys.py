"""API keys: hashed configuration, constant-time verification, clear errors for bad entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.api_keys import KeyRing, hash_key, main, new_key


def test_configured_hashes_verify_their_keys_and_nothing_else(tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nbob:sha256:{hash_key(bob)}\n\n")
    ring = KeyRing.load(f"alice:sha256:{hash_key(alice)}", keys_file)
    assert len(ring) == 2
    assert ring.verify(alice) == "alice" and ring.verify(bob) == "bob"
    assert ring.verify(alice + "x") is None and ring.verify("") is None
    assert alice not in keys_file.read_text()


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("alice:" + "0" * 64, "NAME:sha256"),
        ("alice:sha256:xyz", "NAME:sha256"),
        ("al ice:sha256:" + "0" * 64, "NAME:sha256"),
    ],
)
def test_bad_entries_are_refused_without_echoing_digests(entry: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as caught:
        KeyRing.parse([entry])
    assert "0" * 64 not in str(caught.value)


def test_a_name_configured_twice_is_refused() -> None:
    digest = hash_key(new_key())
    with pytest.raises(ValueError, match="twice"):
        KeyRing.parse([f"a:sha256:{digest}", f"a:sha256:{digest}"])


def test_the_minting_command_prints_a_key_and_its_config_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ci-bot"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].rsplit(" ", 1)[1]
    line = out[1].rsplit(" ", 1)[1]
    assert KeyRing.parse([line]).verify(token) == "ci-bot"
    assert main(["bad name"]) == 2
