"""A verifying HTTP client: attested once, pinned to the attested TLS key, every answer's signature checked.

The OpenAI Python SDK accepts it unchanged as ``http_client=``::

    from openai import OpenAI
    from tee_inference.client import AttestedClient

    http = AttestedClient("https://llm.example:8000", model="SmolLM2-135M-Instruct",
                          expect="measurements/expected.json")
    llm = OpenAI(base_url="https://llm.example:8000/v1", api_key="…", http_client=http)
    print(llm.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[…]))

Before the first request it attests the server with a fresh nonce (quote, GPU evidence, expected
measurements, the TLS key bound into report_data) and pins every connection to the attested SPKI,
checked during the TLS handshake, so nothing is sent to a peer that is not the attested server.
Each completion's signature is checked over the exact bytes sent and received: from the
``X-Signature*`` headers for whole answers, and for streams when ``data: [DONE]`` arrives — in-band
when the server sends it (``X-Signature-Inband``), else fetched by completion id — before the SDK
sees the last event. Any mismatch raises ``SignatureMismatchError``; a server that does not verify,
``AttestationError``. When a handshake fails because the server came back with a new key (a
reboot), it attests again once and retries: the request had not been sent.

With ``encrypt=True`` completion bodies are also end-to-end encrypted (EHBP, ``e2ee.py``) to the
X25519 key the boot's keyset event attests, for deployments where a gateway or load balancer
outside the CVM routes the request: the body it sees is ciphertext, the model name travels in the
``X-Tee-Model`` header, and the signature covers the ciphertext both ways (the exact bytes
exchanged), so a third party can check it without reading the prompt.

Through a gateway (docs/gateway.md) the report lists every node it routes to; a response is
checked under the key of the node that signed it, which must be one of the verified ones, and with
``encrypt=True`` each body is sealed to one node (named in ``X-Tee-Node`` for the gateway to route).
``gateway=True`` says the TLS connection ends at the gateway, outside the CVMs: it is checked as any
https site's, not pinned, and ``encrypt=True`` is then required.

``AsyncAttestedClient`` is the same for ``AsyncOpenAI``. The checks on the response bytes are
shared (``ResponseChecker``); only the I/O differs.
"""

from tee_inference.client.aio import AsyncAttestedClient, AsyncAttestedTransport
from tee_inference.client.checks import (
    Attestation,
    AttestationError,
    AttestedNode,
    ResponseChecker,
    SignatureMismatchError,
)
from tee_inference.client.sync import AttestedClient, AttestedTransport

__all__ = [
    "AsyncAttestedClient",
    "AsyncAttestedTransport",
    "Attestation",
    "AttestationError",
    "AttestedClient",
    "AttestedNode",
    "AttestedTransport",
    "ResponseChecker",
    "SignatureMismatchError",
]
