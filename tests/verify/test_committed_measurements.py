"""The committed measurements/expected.json verifies the stack `make run` starts, end to end.

`make run` serves SmolLM2 on a simulated dstack CVM that launched image/app-compose.json and claims
the image digest the file records. The fake engine stands in for vLLM here (the slow suite runs the
real one); everything the verifier compares — MRTD, RTMR0–2, MRCONFIGID, compose and OS image
hashes, TD attributes, image digest, weights root — comes from the committed files.
"""

from __future__ import annotations

import json

import httpx

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
    )
    policy = VerificationPolicy.build(expected=[load_expected_measurements(EXPECTED)], allow_simulated=True)
    with running(SigningMiddleware(FakeEngine(MODEL), services=boot(config))) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            result = verify_url(url, MODEL, policy, verifier=Verifier.production(), client=client)
    assert result.ok, [(c.name, c.detail) for c in result.blocking]
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
