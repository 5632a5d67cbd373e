"""The consortium's TLS certificates and the SuperNodes' authentication keys.

- A consortium CA (ECDSA P-384 key, self-signed, may sign server certificates only) and the
  SuperLink's server certificate signed by it, with a subject alternative name for every address
  nodes dial. ``localhost`` and ``127.0.0.1`` are always included: the SuperLink's own helper
  processes (``flower-superexec``) reach its API over loopback and verify the same certificate.
- A SuperNode authentication key: ECDSA P-384 in OpenSSH format (what ``ssh-keygen -t ecdsa -b
  384`` writes), which ``flower-supernode --auth-supernode-private-key`` reads; its ``.pub`` is
  what the coordinator enrols with ``flwr supernode register``.

Guarantees: private keys are written atomically with mode 0600 in a 0700 directory and are never
replaced unless the caller asks (``overwrite=True``); a half-written key file never exists under
its final name. This is the only module that handles private key bytes for deployment.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twinfed.errors import TwinfedError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
NODE_KEY = "supernode-auth.key"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server-certificate lifetime common TLS clients accept


class CertError(TwinfedError):
    """A certificate or key could not be made, written or read."""


@dataclass(frozen=True)
class ConsortiumCerts:
    """Where the coordinator's files are. ``ca_cert`` goes to every hospital (it is public);
    ``ca_key`` and ``server_key`` never leave the coordinator."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    new_ca: bool


def make_consortium_certs(out_dir: str | Path, hosts: list[str] | tuple[str, ...] = (), *,
                          overwrite: bool = False, now: dt.datetime | None = None) -> ConsortiumCerts:
    """Make (or reuse) the consortium CA in ``out_dir`` and a SuperLink certificate for ``hosts``.

    An existing CA (``ca.key`` + ``ca.crt``) is reused, so hospitals keep trusting the same root
    when the server certificate is renewed; delete both on purpose to start a new CA. An existing
    server key is replaced only with ``overwrite=True``. ``now`` fixes the validity start (tests).
    """
    out = _private_dir(out_dir)
    names = _normalise_hosts(hosts)
    now = now or dt.datetime.now(dt.timezone.utc)
    ca_cert_p, ca_key_p = out / CA_CERT, out / CA_KEY
    srv_cert_p, srv_key_p = out / SERVER_CERT, out / SERVER_KEY
    if srv_key_p.exists() and not overwrite:
        raise CertError(f"{srv_key_p} exists; pass --force to replace the SuperLink's key and "
                        "certificate (the CA is kept)")

    new_ca = not ca_key_p.exists()
    if new_ca:
        if ca_cert_p.exists():
            raise CertError(f"{ca_cert_p} exists without {ca_key_p}; restore the CA key from the "
                            "backup, or move the old certificate away to start a new CA")
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = _ca_certificate(ca_key, now)
        write_private_file(ca_key_p, _pem_key(ca_key), overwrite=False)
        write_public_file(ca_cert_p, ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_key, ca_cert = _load_ca(ca_key_p, ca_cert_p)

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = _server_certificate(srv_key, ca_key, ca_cert, names, now)
    write_private_file(srv_key_p, _pem_key(srv_key), overwrite=overwrite)
    write_public_file(srv_cert_p, srv_cert.public_bytes(serialization.Encoding.PEM))
    return ConsortiumCerts(ca_cert=ca_cert_p, ca_key=ca_key_p, server_cert=srv_cert_p,
                           server_key=srv_key_p, hosts=tuple(names), new_ca=new_ca)


def make_node_auth_key(out_dir: str | Path, *, name: str = NODE_KEY,
                       overwrite: bool = False) -> tuple[Path, Path]:
    """A SuperNode authentication key pair in ``out_dir``: ``(private_path, public_path)``.

    The private key (OpenSSH format, 0600) stays on the hospital's node; the public key
    (``<name>.pub``, one OpenSSH line) is sent to the coordinator to enrol the node.
    """
    out = _private_dir(out_dir)
    priv_p, pub_p = out / name, out / f"{name}.pub"
    if priv_p.exists() and not overwrite:
        raise CertError(f"{priv_p} exists; a node keeps its key (the coordinator enrolled it). "
                        "Pass --force only to replace it, then enrol the new .pub")
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    write_private_file(priv_p, priv, overwrite=overwrite)
    write_public_file(pub_p, pub + f" twinfed-{name}\n".encode())
    return priv_p, pub_p


def public_key_fingerprint(pub_path: str | Path) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key, as ``ssh-keygen -lf`` prints it: read it out
    over the phone before enrolling a node, so a swapped file is caught."""
    import base64
    import hashlib

    try:
        blob = base64.b64decode(Path(pub_path).read_text().split()[1])
    except (OSError, IndexError, ValueError) as exc:
        raise CertError(f"{pub_path}: not an OpenSSH public key ({exc})") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_certificate(path: str | Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from None


def verify_server_certificate(ca_cert: str | Path, server_cert: str | Path) -> None:
    """Raise :class:`CertError` unless ``server_cert`` was signed by ``ca_cert``'s key."""
    ca, srv = load_certificate(ca_cert), load_certificate(server_cert)
    try:
        srv.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertError(f"{server_cert} was not issued by {ca_cert} "
                        f"({type(exc).__name__}); make the certificates again") from None


def write_private_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` with mode 0600, atomically: the final name appears only when complete."""
    _write_atomic(Path(path), data, 0o600, overwrite=overwrite)


def write_public_file(path: Path, data: bytes) -> None:
    _write_atomic(Path(path), data, 0o644, overwrite=True)


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no check-then-write race
            except FileExistsError:
                raise CertError(f"{path} exists; refusing to overwrite a key") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _private_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CertError(f"cannot create {out}: {exc.strerror}") from None
    return out


def _normalise_hosts(hosts) -> list[str]:
    names: list[str] = []
    for h in [*hosts, *LOOPBACK_HOSTS]:
        h = h.strip().lower()
        if not h:
            continue
        if "://" in h or "/" in h or (":" in h and not _is_ip(h)):
            raise CertError(f"--host {h!r}: give a DNS name or an IP address, without scheme or "
                            "port (e.g. --host link.consortium.example --host 10.0.0.5)")
        if h not in names:
            names.append(h)
    return names


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in names:
        if _is_ip(h):
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        else:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twinfed consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "twinfed consortium CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        # path_length=0: the CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(key, ca_key, ca_cert: x509.Certificate, names: list[str],
                        now: dt.datetime) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twinfed consortium"),
                         x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _load_ca(key_p: Path, cert_p: Path):
    try:
        key = serialization.load_pem_private_key(key_p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"{key_p}: cannot read the CA key ({exc})") from None
    cert = load_certificate(cert_p)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise CertError(f"{cert_p} does not belong to {key_p}; restore the matching pair")
    return key, cert
