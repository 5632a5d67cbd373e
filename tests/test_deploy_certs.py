"""Consortium certificates and node keys (no processes: fast)."""

import datetime as dt
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from twinfed.cli.main import main
from twinfed.deploy.certs import (CertError, make_consortium_certs, make_node_auth_key,
                                  public_key_fingerprint, verify_server_certificate)


def mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_server_certificate_names_every_host_and_loopback(tmp_path):
    c = make_consortium_certs(tmp_path, ["link.consortium.example", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(c.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.consortium.example", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.5"),
                                                            ipaddress.ip_address("127.0.0.1")}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_certificate_chains_to_the_consortium_ca_and_not_to_another(tmp_path):
    c = make_consortium_certs(tmp_path / "a", ["link"])
    verify_server_certificate(c.ca_cert, c.server_cert)
    ca = x509.load_pem_x509_certificate(c.ca_cert.read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    other = make_consortium_certs(tmp_path / "b", ["link"])
    with pytest.raises(CertError, match="was not issued by"):
        verify_server_certificate(other.ca_cert, c.server_cert)


def test_private_keys_are_0600_in_a_0700_directory(tmp_path):
    c = make_consortium_certs(tmp_path / "certs", ["link"])
    priv, pub = make_node_auth_key(tmp_path / "node")
    assert mode(c.ca_key) == mode(c.server_key) == mode(priv) == 0o600
    assert mode(tmp_path / "certs") == mode(tmp_path / "node") == 0o700
    assert mode(c.ca_cert) == mode(pub) == 0o644
    assert not list((tmp_path / "certs").glob(".*")), "no temporary files left behind"


def test_existing_keys_are_not_overwritten_unless_asked(tmp_path):
    c = make_consortium_certs(tmp_path, ["link"])
    before = c.server_key.read_bytes(), c.ca_key.read_bytes()
    with pytest.raises(CertError, match="--force"):
        make_consortium_certs(tmp_path, ["link"])
    assert c.server_key.read_bytes() == before[0]
    again = make_consortium_certs(tmp_path, ["link", "link2"], overwrite=True)
    assert again.server_key.read_bytes() != before[0]
    assert c.ca_key.read_bytes() == before[1] and not again.new_ca, "the CA is kept"
    verify_server_certificate(again.ca_cert, again.server_cert)

    priv, _ = make_node_auth_key(tmp_path / "node")
    key = priv.read_bytes()
    with pytest.raises(CertError, match="exists"):
        make_node_auth_key(tmp_path / "node")
    assert priv.read_bytes() == key


def test_node_key_is_ecdsa_p384_in_openssh_format(tmp_path):
    priv, pub = make_node_auth_key(tmp_path)
    key = serialization.load_ssh_private_key(priv.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert priv.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    loaded = serialization.load_ssh_public_key(pub.read_bytes())
    assert loaded.public_numbers() == key.public_key().public_numbers()
    assert public_key_fingerprint(pub).startswith("SHA256:")


def test_certificate_validity_starts_at_the_given_time(tmp_path):
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    c = make_consortium_certs(tmp_path, ["link"], now=now)
    cert = x509.load_pem_x509_certificate(c.server_cert.read_bytes())
    assert cert.not_valid_before_utc == now - dt.timedelta(minutes=5)
    assert (cert.not_valid_after_utc - now).days == 825


@pytest.mark.parametrize("host", ["https://link", "link:8000", "10.0.0.0/8"])
def test_a_host_with_scheme_port_or_mask_is_a_one_line_error(tmp_path, host, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path), "--host", host]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("twinfed: error: --host") and "\n" not in err
    assert not (tmp_path / "ca.key").exists()


def test_cli_writes_certs_and_node_key(tmp_path, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path / "c"), "--host", "link.example"]) == 0
    assert main(["deploy", "node-key", "--out", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    assert "link.example" in out and "fingerprint" in out
    assert (tmp_path / "n" / "supernode-auth.key.pub").is_file()
    assert main(["deploy", "node-key", "--out", str(tmp_path / "n")]) == 1
