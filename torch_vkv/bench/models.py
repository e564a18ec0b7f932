"""Random-weight models for the serving benchmark: no downloads.

The architectures of Llama-3-8B and Yi-6B-200k (both transformers' Llama
family), and a tiny one for CPU smoke runs. Built on the ``meta`` device, then
``to_empty`` on the target device and every parameter drawn from
``normal_(0, 0.02)``: an 8B model has random weights in about a second. With
random weights every request runs to its trace length (``ignore_eos``).
"""

from __future__ import annotations

from typing import Any

import torch

from torch_vkv._checks import fail

__all__ = ["MODELS", "build_model", "model_config", "random_model", "weight_bytes"]

#: Llama-family configurations (``LlamaConfig`` keyword arguments).
MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "yi-6b-200k": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=64000, rope_theta=5000000.0, max_position_embeddings=200000,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1 << 18,
    ),
}  # fmt: skip


def model_config(name: str) -> Any:
    """The ``LlamaConfig`` of ``name`` (one of :data:`MODELS`)."""
    from transformers import LlamaConfig

    if name not in MODELS:
        fail("model", f"one of {tuple(MODELS)}", name)
    return LlamaConfig(**MODELS[name], tie_word_embeddings=False)


def random_model(cls: Any, config: Any, *, device: Any, dtype: torch.dtype, seed: int = 0,
                 norm_weight: float = 1.0) -> torch.nn.Module:  # fmt: skip
    """``cls(config)`` built on the ``meta`` device, then ``to_empty`` on ``device``:
    every parameter ``normal_(0, 0.02)``, RMSNorm weights ``norm_weight`` (1 for
    Llama's ``w * x``, 0 for Gemma's ``(1 + w) * x``: what a trained model's are
    near). Buffers are left to the caller: ``to_empty`` leaves them uninitialised."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.fill_(norm_weight)
    return model


def build_model(name: str, *, device: Any, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of ``name``'s shape with random weights, on ``device``."""
    from transformers import LlamaForCausalLM

    config = model_config(name)
    model = random_model(LlamaForCausalLM, config, device=device, dtype=dtype, seed=seed, norm_weight=1.0)
    # Buffers (the rotary inv_freq) are not parameters: to_empty left them
    # uninitialised, so rebuild every module that owns one.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq"):
                with torch.device(device):
                    setattr(parent, child_name, type(child)(config=config))
    model.generation_config.eos_token_id = None
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one forward reads in full: every parameter but the
    input embedding table (a forward reads only its prompt's rows)."""
    emb = model.get_input_embeddings()
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
