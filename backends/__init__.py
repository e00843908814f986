"""Engines behind the control plane: the SimPy simulator (``sim``) and real vLLM (``vllm``)."""

import cpsim  # noqa: F401  (first: a stale compiled build is bypassed before any of it loads)
