"""Talking to a deployed service: smoke test and post-deployment evaluation (standard library + NumPy only)."""
