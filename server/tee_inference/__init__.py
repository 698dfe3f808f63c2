"""tee-inference: signed, attested OpenAI-compatible inference inside a TDX confidential VM."""

__version__ = "0.1.0"
