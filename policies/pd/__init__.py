"""Prefill/decode disaggregation policies: whether a prompt is prefilled on a prefill instance."""
