"""Key files, rotation and the start-up announcement; no server needed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from serve_app.auth import KeyRing, Principal, append_key, parse_lines
from serve_app.cli import main
from serve_app.cli.serve import announce_keys, is_loopback

ROOT = Path(__file__).resolve().parents[1]


def test_keys_are_stored_as_hashes_and_rotate(tmp_path):
    path = tmp_path / "keys"
    old, prior = append_key(path, "alice", "user")
    assert prior == 0 and old not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ring = KeyRing(path)
    assert ring.authenticate(old) == Principal("alice", "user")
    assert ring.authenticate(old + "x") is None
    # Rotation: a second key for the same name; both work, jobs stay with the name.
    new, prior = append_key(path, "alice", "user")
    assert prior == 1 and ring.authenticate(new) == Principal("alice", "user")
    # Remove the old line: the ring re-reads the changed file.
    lines = [ln for ln in path.read_text().splitlines() if not ln.endswith(_digest_of(old))]
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime even within one clock tick
    assert ring.authenticate(old) is None and ring.authenticate(new) is not None


def _digest_of(key: str) -> str:
    from serve_app.auth import digest

    return digest(key).hex()


def test_a_broken_key_file_keeps_the_last_good_keys(tmp_path):
    path = tmp_path / "keys"
    key, _ = append_key(path, "ops", "admin")
    ring = KeyRing(path)
    assert ring.authenticate(key) == Principal("ops", "admin")
    path.write_text(path.read_text() + "half a line\n")
    assert ring.authenticate(key) == Principal("ops", "admin")


@pytest.mark.parametrize("text", [
    "alice user sha256:abc",                              # short digest
    "alice root sha256:" + "0" * 64,                      # unknown role
    "alice\n user sha256:" + "0" * 64,                    # split line
    "al/ice user sha256:" + "0" * 64,                     # bad name
    f"a user sha256:{'0' * 64}\na admin sha256:{'1' * 64}",  # one name, two roles
])
def test_malformed_key_lines_are_refused(text):
    with pytest.raises(ValueError):
        parse_lines(text, "keys")


def test_keys_from_the_environment(monkeypatch, tmp_path):
    key, _ = append_key(tmp_path / "k", "ci", "user")
    monkeypatch.setenv("PE_TEST_KEYS", (tmp_path / "k").read_text())
    assert KeyRing(None, "PE_TEST_KEYS").authenticate(key) == Principal("ci", "user")


def test_keys_cli_prints_the_key_once(tmp_path):
    path = tmp_path / "keys"
    r = CliRunner().invoke(main, ["keys", "create", "bob", "--role", "admin", "--file", str(path)])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[0]
    assert key.startswith("pe_") and key not in path.read_text()
    assert KeyRing(path).authenticate(key) == Principal("bob", "admin")
    listed = CliRunner().invoke(main, ["keys", "list", "--file", str(path)])
    assert "bob\tadmin" in listed.output and key not in listed.output


def test_start_announces_keys_and_warns_on_a_network_address(capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    announce_keys(False, "127.0.0.1")
    out = capsys.readouterr()
    assert "API keys: off" in out.out and "WARNING" not in out.err
    announce_keys(False, "0.0.0.0")
    assert "WARNING: serving on 0.0.0.0 with API keys OFF" in capsys.readouterr().err
    announce_keys(True, "0.0.0.0")
    out = capsys.readouterr()
    assert "API keys: ON" in out.out and "WARNING" not in out.err


def test_keys_webhook_secret_prints_what_signs_that_keys_callbacks(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """The operator hands a key's holder the secret its job callbacks are signed with; a
    receiver verifies a real signature with it, and not with another key's."""
    import yaml

    from serve_app.cli.keys import keys_group
    from serve_app.cli.serve_file import load_serve_file
    from serve_app.jobs.webhooks import secret_for, sign, verify

    raw = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    raw["applications"][0]["args"].setdefault("jobs", {})["webhook_secret"] = "s3cret-of-server"
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    monkeypatch.delenv("PHOTOENHANCE_WEBHOOK_SECRET", raising=False)

    def run(*args: str) -> Any:
        return CliRunner().invoke(keys_group, ["webhook-secret", *args, "--config",
                                               str(config_file)])

    alice, bob = run("alice"), run("bob")
    assert alice.exit_code == 0 and bob.exit_code == 0, alice.output
    secret = bytes.fromhex(alice.output.strip())
    jobs = load_serve_file(config_file).app.jobs
    assert secret == secret_for(jobs, "alice") != bytes.fromhex(bob.output.strip())
    body, ts = b'{"job_id": "j1", "state": "completed"}', int(time.time())
    signature = sign(secret_for(jobs, "alice"), ts, body)  # what the server sends
    assert verify(secret, str(ts), body, signature)
    assert not verify(bytes.fromhex(bob.output.strip()), str(ts), body, signature)

    bad = run("../alice")
    assert bad.exit_code == 1 and "not a key name" in bad.output
    raw["applications"][0]["args"]["jobs"]["webhook_secret"] = None
    config_file.write_text(yaml.safe_dump(raw))
    off = run("alice")
    assert off.exit_code == 1 and "PHOTOENHANCE_WEBHOOK_SECRET" in off.output
