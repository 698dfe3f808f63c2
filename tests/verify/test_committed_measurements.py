"""The committed measurements/expected.json verifies the stack `make run` starts, end to end.

`make run` serves SmolLM2 on a simulated dstack CVM that launched image/app-compose.json and claims
the image digest the file records. The fake engine stands in for vLLM here (the slow suite runs the
real one); everything the verifier compares — MRTD, RTMR0–2, MRCONFIGID, compose and OS image
hashes, TD attributes, image digest, weights root — comes from the committed files.
"""

from __future__ import annotations

import json

from support.paths import REPO
from support.servers import running
from tee_inference.boot import boot
from tee_inference.config import ServerConfig
from tee_inference.engines.fake import FakeEngine
from tee_inference.middleware import SigningMiddleware
from tee_inference.verify import VerificationPolicy, Verifier, load_expected_measurements
from tee_inference.verify.e2e import verify_url

EXPECTED = REPO / "measurements" / "expected.json"
MODEL = "SmolLM2-135M-Instruct"


def test_make_run_stack_verifies_against_the_committed_file() -> None:
    committed = json.loads(EXPECTED.read_text())
    config = ServerConfig.build(
        served_models=(MODEL,),
        model_weights_root=committed["models"][MODEL]["weights_root"],
        image_digest=committed["image_digest"][0],
        simulated_compose=REPO / "image" / "app-compose.json",
        tls="self-signed",
    )
    policy = VerificationPolicy.build(expected=[load_expected_measurements(EXPECTED)], allow_simulated=True)
    services = boot(config)
    tls = services.keys.tls
    assert tls is not None
    tls.write_files(None, require_ram=False)
    try:
        with running(
            SigningMiddleware(FakeEngine(MODEL), services=services), ssl_context=tls.serve_context()
        ) as url:
            result = verify_url(url, MODEL, policy, verifier=Verifier.production())
    finally:
        tls.close()
    assert result.ok, [(c.name, c.detail) for c in result.blocking]
    assert result.check("tls_binding").status.value == "pass"
    measured = result.check("measurements").detail
    for field in (
        "mrtd ok",
        "rtmr2 ok",
        "mrconfigid ok",
        "compose_hash ok",
        "os_image_hash ok",
        "image_digest ok",
    ):
        assert field in measured
    assert result.check("mrconfigid").status.value == "pass"
    assert result.relaxations() == []
