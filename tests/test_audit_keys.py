"""Audit keys: private files are 0600 from birth, never overwritten, refused when others can read them."""

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from fs_faults import disk_full
from twinfed.errors import KeyFileError
from twinfed.governance.keys import (generate_signing_key, load_public_key, load_signer,
                                     public_key_fingerprint, public_key_path, signature_ok)


def test_a_new_private_key_file_is_mode_0600_and_its_directory_0700(tmp_path):
    generate_signing_key(tmp_path / "keys" / "audit_ed25519")
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "audit_ed25519").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700


def test_a_loaded_key_signs_what_its_public_file_verifies(tmp_path):
    path = tmp_path / "k"
    made = generate_signing_key(path)
    signer = load_signer(path)
    pub = load_public_key(public_key_path(path))
    assert signer.fingerprint == made.fingerprint == public_key_fingerprint(pub)
    assert signature_ok(pub, signer.sign(b"x" * 32), b"x" * 32)
    assert not signature_ok(pub, signer.sign(b"x" * 32), b"y" * 32)
    assert "PRIVATE" not in repr(signer)


def test_generating_never_overwrites_a_key(tmp_path):
    path = tmp_path / "k"
    generate_signing_key(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_signing_key(path)
    assert path.read_bytes() == before


def test_a_key_others_can_read_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "k"
    generate_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=r"mode 0644 .* must be 0600 \(chmod 600"):
        load_signer(path)


def test_a_missing_key_names_the_file_and_what_to_do(tmp_path):
    with pytest.raises(KeyFileError, match=r"k: no signing key; initialise the state directory"):
        load_signer(tmp_path / "k")


def test_a_file_that_is_not_a_key_is_a_clear_error(tmp_path):
    path = tmp_path / "k"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_signer(path)


def test_the_fingerprint_is_sha256_of_the_raw_public_bytes(tmp_path):
    signer = generate_signing_key(tmp_path / "k")
    raw = signer.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signer.fingerprint == hashlib.sha256(raw).hexdigest()


def test_a_key_the_disk_cuts_short_leaves_no_half_key_behind(tmp_path, monkeypatch):
    disk_full(monkeypatch, tmp_path, room=20)
    with pytest.raises(KeyFileError, match=r"cannot write .*k: no space left on the device"):
        generate_signing_key(tmp_path / "k")
    assert not (tmp_path / "k").exists()
