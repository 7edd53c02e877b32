"""Test certificates made with the openssl CLI: a CA, and server certs for chosen names."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         f"/CN=spotfi test {name}", "-keyout", str(key), "-out", str(cert),
         # Python 3.13 verifies strictly (VERIFY_X509_STRICT): a real CA's extensions
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash", cwd=directory)
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path], san: str,
                     name: str = "server", usage: str = "serverAuth") -> tuple[Path, Path]:
    """``san`` like ``IP:127.0.0.1,DNS:localhost``; ``usage="clientAuth"`` for a client."""
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=spotfi test server",
         "-keyout", str(key), "-out", str(csr), cwd=directory)
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert), cwd=directory)
    return cert, key
