"""Engines the signing layer can front: the fake one, a proxied upstream, and vLLM."""
