"""Prefill/decode hand-off on real engines: vLLM's ``kv_transfer_params`` and KV connectors.

A PREFILL dispatch runs ``max_tokens=1`` with ``PREFILL_KV_PARAMS`` on the prefill engine;
the ``kv_transfer_params`` it answers with (None for connectors that need none, such as the
file-based ExampleConnector) are kept in a ``HandoffStore`` until the DECODE dispatch sends
them, with the same prompt, to the decode engine. Both engines must run a KV connector
(``example_connector_config`` for two engines on one host).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: What the prefill request asks: keep the KV cache for a remote decode.
PREFILL_KV_PARAMS: dict[str, Any] = {"do_remote_decode": True, "do_remote_prefill": False}


def example_connector_config(shared_storage_path: str | Path) -> dict[str, Any]:
    """``--kv-transfer-config`` (or ``kv_transfer_config=``) of vLLM's ExampleConnector: each
    engine saves the KV cache of the prompts it computes to files under the path and loads
    them for prompts it finds there (full blocks only). Works on CPU, between processes of
    one host."""
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(shared_storage_path)},
    }


class HandoffStore:
    """``kv_transfer_params`` of prefilled requests by request id, until their decode."""

    def __init__(self) -> None:
        self._params: dict[str, dict[str, Any] | None] = {}

    def put(self, request_id: str, params: dict[str, Any] | None) -> None:
        self._params[request_id] = dict(params) if params else None

    def pop(self, request_id: str) -> dict[str, Any] | None:
        return self._params.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._params

    def __len__(self) -> int:
        return len(self._params)
