"""`tee-inference gateway`: many attested nodes behind one endpoint (docs/gateway.md).

`app` (routes and handlers), `nodes` (verification, pinning, probing, routing), `forward` (the
bytes of a completion, both ways), `answers` (reports and signatures of the nodes), `limits`
(per-key rate limits), `outbox` (durable usage records and their reporting), `config`, `metrics`.
"""
