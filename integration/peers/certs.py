#!/usr/bin/env python3
"""Test certificates made independently of `locality-sidecar certs`, mounted the kubelet way.

A Kubernetes Secret volume is a directory whose files are symlinks through `..data`, itself a
symlink to a timestamped directory; an update writes a new timestamped directory and renames a
new `..data` link over the old one (atomic), then deletes the old directory. `issue` does exactly
that, so a sidecar watching the files sees what it would see in a pod.

  certs.py ca --out DIR
  certs.py issue --ca DIR --mount DIR --lifetime SECONDS [--name DNS]... [--identity URI] [--bad-key]
"""

import argparse
import datetime
import os
import shutil
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def pem_key(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(out):
    os.makedirs(out, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rotation test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    with open(os.path.join(out, "ca.crt"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(out, "ca.key"), "wb") as f:
        f.write(pem_key(key))


def make_leaf(ca_dir, lifetime, names, identities):
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(ca_dir, "ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    # Valid from the moment it is made, so its whole lifetime is the lifetime asked for.
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    sans = [x509.DNSName(name) for name in names] + [
        x509.UniformResourceIdentifier(uri) for uri in identities
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rotation test leaf")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(seconds=lifetime))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def swap_in(mount, files):
    """Writes `files` (name -> bytes) as the mount's new contents, the kubelet's way."""
    os.makedirs(mount, exist_ok=True)
    stamp = "..%s_%d" % (time.strftime("%Y_%m_%d_%H_%M_%S"), time.monotonic_ns())
    new_dir = os.path.join(mount, stamp)
    os.makedirs(new_dir)
    for name, data in files.items():
        with open(os.path.join(new_dir, name), "wb") as f:
            f.write(data)
    data_link = os.path.join(mount, "..data")
    old = os.readlink(data_link) if os.path.islink(data_link) else None
    tmp_link = os.path.join(mount, "..data_tmp")
    os.symlink(stamp, tmp_link)
    os.rename(tmp_link, data_link)
    for name in files:
        link = os.path.join(mount, name)
        if not os.path.islink(link):
            os.symlink(os.path.join("..data", name), link)
    if old:
        shutil.rmtree(os.path.join(mount, old), ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca")
    ca.add_argument("--out", required=True)
    issue = sub.add_parser("issue")
    issue.add_argument("--ca", required=True)
    issue.add_argument("--mount", required=True)
    issue.add_argument("--lifetime", type=float, required=True)
    issue.add_argument("--name", action="append", default=[])
    issue.add_argument("--identity", action="append", default=[])
    issue.add_argument("--bad-key", action="store_true", help="a key that does not match the certificate")
    args = parser.parse_args()
    if args.command == "ca":
        make_ca(args.out)
        return 0
    names = args.name or ["locality-sidecar"]
    cert, key = make_leaf(args.ca, args.lifetime, names, args.identity)
    if args.bad_key:
        key = ec.generate_private_key(ec.SECP256R1())
    with open(os.path.join(args.ca, "ca.crt"), "rb") as f:
        ca_pem = f.read()
    swap_in(
        args.mount,
        {
            "ca.crt": ca_pem,
            "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
            "tls.key": pem_key(key),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
