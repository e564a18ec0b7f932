"""Serving engine on virtual KV: continuous batching with chunked prefill,
preemption, seeded sampling and CUDA graphs (see ``docs/serving.md``).

    from torch_vkv.serving import Engine, SamplingParams
    engine = Engine(model, max_batch_size=64, max_seq_len=8192)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=128, temperature=0.0))
"""

from torch_vkv.serving.engine import Engine
from torch_vkv.serving.llm import LLM
from torch_vkv.serving.outputs import CompletionOutput, RequestMetrics, RequestOutput
from torch_vkv.serving.params import SamplingParams, completion_seed

__all__ = ["LLM", "CompletionOutput", "Engine", "RequestMetrics", "RequestOutput", "SamplingParams", "completion_seed"]
