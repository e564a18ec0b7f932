"""Several ``Engine`` objects at once, over one model: each switches the
model's attention to ``"vkv_serving"`` while open, and the compiled decode
step (``compile=True``) is shared between them. One engine's ``close`` must
never change what another one computes; the last one closed puts the model
back.
"""

from __future__ import annotations

import random

import pytest

transformers = pytest.importorskip("transformers")

from tests.test_serving import assert_greedy_equal, engine_for, greedy, make_model, random_prompts, reference  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_torch_append(no_interpreted_triton):
    """Whole models on the CPU append with plain torch (conftest)."""


@pytest.mark.parametrize("close_first", ["a", "b"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_engines_on_one_model_serve_on_when_one_closes(compile, close_first):
    """Two engines over one model, their steps interleaved; one is closed
    mid-generation and the other finishes with ``generate()``'s tokens (the
    first close used to put the model's attention back to sdpa under the
    engine still running: silent wrong tokens). The model is ``sdpa`` again
    only once both are closed."""
    model = make_model("llama")
    prompts = random_prompts(random.Random(3), 4, lo=5, hi=30)
    refs = [reference(model, p, 12) for p in prompts]
    engines = {"a": engine_for(model, "virtual-per_layer", max_batch_size=2, compile=compile),
               "b": engine_for(model, "paged", max_batch_size=2, compile=compile)}  # fmt: skip
    for i, p in enumerate(prompts):
        engines["ab"[i // 2]].add_request(p, greedy(12), request_id=str(i))
    outs = {}
    for _ in range(4):
        for e in engines.values():
            outs.update((o.request_id, o) for o in e.step())
    engines.pop(close_first).close()
    assert model.config._attn_implementation == "vkv_serving"
    (rest,) = engines.values()
    while rest.has_unfinished_requests():
        outs.update((o.request_id, o) for o in rest.step())
    rest.close()
    assert model.config._attn_implementation == "sdpa"
    for i in (range(2, 4) if close_first == "a" else range(2)):
        assert_greedy_equal(model, prompts[i], outs[str(i)].token_ids, refs[i])
