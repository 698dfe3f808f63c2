"""`tee-inference bench`: what the signing layer costs, measured side by side in one run.

- `cost`: CPU µs per request and per streamed event of the middleware in process, against the
  floor (the hashing and signing any signing layer must do);
- `http`: throughput, latency and time to first byte over loopback for the bare engine, the
  middleware inside the engine's server, the standalone proxy, the same proxy without signing,
  and any peer given by URL; `report` renders the table, JSON and chart.

Numbers are reported, never judged by the test suite.
"""
