"""Ed25519 audit-signing keys: the only module that touches private key bytes.

Guarantees:
- a private key file is created with ``O_CREAT | O_EXCL`` and mode 0600 from its first byte (no
  window in which it is readable by others), fsynced, and never overwritten; a write that fails
  (a full disk) removes the part written and raises :class:`KeyFileError` naming the file;
- loading refuses a private key readable or writable by group or others, as ssh does, because a
  key others can read lets them forge the owner's audit log;
- everything else gets a :class:`Signer` (sign bytes, know its public key) and never the key.

Files are PEM: PKCS#8 for the private key (unencrypted: a node signs unattended, so the file
mode and the host's disk protection are the controls), SubjectPublicKeyInfo for ``<key>.pub``.
A key's fingerprint is the SHA-256 (hex) of its 32 raw public bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from twinfed.atomic import cannot_write, fsync_dir, make_dir, write_all, write_bytes_atomic
from twinfed.errors import KeyFileError

PRIVATE_MODE = 0o600


class Signer:
    """Signs with a private key it keeps to itself."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.fingerprint = public_key_fingerprint(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:  # never show key material, even by accident in a log
        return f"Signer(fingerprint={self.fingerprint[:16]}...)"


def public_key_path(private_path: str | Path) -> Path:
    p = Path(private_path)
    return p.with_name(p.name + ".pub")


def generate_signing_key(private_path: str | Path) -> Signer:
    """Create a new key at ``private_path`` (0600) and its public half at ``<path>.pub``.

    Refuses to overwrite either file: replacing a node's key would orphan its signed history.
    """
    private_path = Path(private_path)
    pub_path = public_key_path(private_path)
    for p in (private_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p}: a key file already exists; refusing to overwrite it "
                               "(move it aside only if you mean to retire that key)")
    make_dir(private_path.parent, mode=0o700)  # others cannot even list the keys
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        raise KeyFileError(f"{private_path}: a key file already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(cannot_write(private_path, exc)) from None
    try:
        try:
            os.fchmod(fd, PRIVATE_MODE)  # the umask may have narrowed it; never widen beyond 0600
            write_all(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        private_path.unlink(missing_ok=True)  # ours (O_EXCL): never leave half a key behind
        raise KeyFileError(cannot_write(private_path, exc)) from None
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    write_bytes_atomic(pub_path, pub_pem, mode=0o644)
    fsync_dir(private_path.parent)
    return Signer(key)


def load_signer(private_path: str | Path) -> Signer:
    """The signer for the key at ``private_path``; the file must be mode 0600 (or stricter)."""
    private_path = Path(private_path)
    try:
        st = private_path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{private_path}: no signing key; initialise the state directory first "
                           "(twinfed node init --state DIR)") from None
    except OSError as exc:
        raise KeyFileError(f"{private_path}: cannot read the signing key ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{private_path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(f"{private_path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or "
                           f"change the signing key; it must be 0600 (chmod 600 {private_path})")
    try:
        data = private_path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{private_path}: cannot read the signing key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{private_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{private_path}: not an Ed25519 key")
    return Signer(key)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``<key>.pub``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no public key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def public_key_fingerprint(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def signature_ok(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
