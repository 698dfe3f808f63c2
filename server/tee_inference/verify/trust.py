"""Trust anchors: Intel's SGX root (pinned here) and NVIDIA's device identity root (package data).

Intel's root is public and fixed until 2049; pinning its bytes here lets a quote's PCK chain be
checked with no network and no collateral. dcap-qvl carries the same root for the collateral
path; the fingerprint below is the one Intel publishes for "Intel SGX Root CA".
"""

from __future__ import annotations

from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tee_inference.attestation.nvidia_certs import load_nvidia_root
from tee_inference.attestation.tdx_quote import SIMULATED_MARKER
from tee_inference.exceptions import TeeInferenceError

INTEL_SGX_ROOT_CA_SHA256: Final = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

_INTEL_SGX_ROOT_CA_PEM: Final = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""


class TrustAnchorError(TeeInferenceError):
    """A pinned root does not have its pinned fingerprint (the installed package was altered)."""


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def load_intel_root() -> x509.Certificate:
    """Intel SGX Root CA, after checking its pin."""
    root = x509.load_pem_x509_certificate(_INTEL_SGX_ROOT_CA_PEM)
    if fingerprint(root) != INTEL_SGX_ROOT_CA_SHA256:
        raise TrustAnchorError("the pinned Intel SGX Root CA does not match its fingerprint; reinstall")
    return root


def production_nvidia_root() -> x509.Certificate:
    """NVIDIA Device Identity CA from the package data, pin checked by ``load_nvidia_root``."""
    return load_nvidia_root()


def names_simulated(cert: x509.Certificate) -> bool:
    """True when a root's common name says SIMULATED: a routing label, never a trust decision."""
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return False
    return any(SIMULATED_MARKER in str(n.value) for n in names)


def subject(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return "<unparseable subject>"
    return str(names[0].value) if names else cert.subject.rfc4514_string()
