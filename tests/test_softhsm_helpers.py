"""keys.softhsm: configuration and idempotent token creation through softhsm2-util."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from keys import softhsm

pytestmark = pytest.mark.softhsm


def test_write_conf(tmp_path: Path) -> None:
    conf = softhsm.write_conf(tmp_path / "hsm")
    text = conf.read_text()
    assert f"directories.tokendir = {tmp_path / 'hsm' / 'tokens'}\n" in text
    assert "objectstore.backend = file\n" in text and "log.level = ERROR\n" in text
    assert (tmp_path / "hsm" / "tokens").is_dir()
    assert conf.stat().st_mode & 0o077 == 0
    assert softhsm.write_conf(tmp_path / "hsm") == conf  # rewriting is harmless


def test_init_token_is_idempotent(tmp_path: Path) -> None:
    conf = softhsm.write_conf(tmp_path)
    label = f"helpers-{secrets.token_hex(4)}"
    assert not softhsm.token_exists(conf, label)

    assert softhsm.init_token(conf, label, "so-pin-1", "user-pin-1") is True
    assert softhsm.token_exists(conf, label)
    # Again, even with other PINs: left alone, no duplicate label.
    assert softhsm.init_token(conf, label, "so-pin-2", "user-pin-2") is False
    assert softhsm.list_tokens(conf).count(label) == 1

    other = f"helpers-{secrets.token_hex(4)}"
    assert softhsm.init_token(conf, other, "so-pin-1", "user-pin-1") is True
    assert sorted(softhsm.list_tokens(conf)) == sorted([label, other])
    assert not softhsm.token_exists(conf, "helpers")  # exact labels only


def test_tokens_are_private_to_their_configuration(tmp_path: Path) -> None:
    conf_a = softhsm.write_conf(tmp_path / "a")
    conf_b = softhsm.write_conf(tmp_path / "b")
    softhsm.init_token(conf_a, "only-in-a", "so-pin-1", "user-pin-1")
    assert softhsm.token_exists(conf_a, "only-in-a")
    assert not softhsm.token_exists(conf_b, "only-in-a")


@pytest.mark.parametrize(
    ("label", "so_pin", "user_pin"),
    [
        ("", "so-pin-1", "user-pin-1"),
        ("x" * 33, "so-pin-1", "user-pin-1"),
        ("trailing ", "so-pin-1", "user-pin-1"),
        ("ok", "so\x15pin", "user-pin-1"),  # ^U would erase the line on the terminal
        ("ok", "so-pin-1", "123"),
    ],
)
def test_init_token_rejects_bad_input(
    tmp_path: Path, label: str, so_pin: str, user_pin: str
) -> None:
    conf = softhsm.write_conf(tmp_path)
    with pytest.raises(ValueError) as info:
        softhsm.init_token(conf, label, so_pin, user_pin)
    assert so_pin not in str(info.value) and user_pin not in str(info.value)
    assert softhsm.list_tokens(conf) == []


def test_softhsm_error_is_reported(tmp_path: Path) -> None:
    with pytest.raises(softhsm.SoftHSMError, match="softhsm2-util --show-slots failed"):
        softhsm.list_tokens(tmp_path / "missing.conf")
