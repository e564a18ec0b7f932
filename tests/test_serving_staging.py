"""The engine's host staging buffers on CUDA: a step copies its tokens,
positions, lengths and slots to the GPU without blocking, from pinned buffers
that the next step rewrites. A step whose batch samples nothing (non-final
prefill chunks) has no device-to-host sync, so the host could rewrite them
before the GPU copied them; the runner waits for the last copies first.
GPU only (on the CPU the copies are synchronous)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from test_serving import NEAR_TIE_GPU, assert_greedy_equal, greedy, make_model, reference  # noqa: E402

from torch_vkv.serving import Engine  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_prefill_chunks_without_sampling_keep_their_own_metadata(kv):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = make_model("llama", device="cuda")
    prompt = [random.Random(5).randrange(150) for _ in range(300)]
    want = reference(model, prompt, 8)
    extra = dict(layout="per_layer") if kv == "virtual" else dict(block_size=16)
    with Engine(model, max_batch_size=4, max_seq_len=512, chunk_size=32, device="cuda", cuda_graphs=False,
                kv=kv, **extra) as e:  # fmt: skip
        seen, expected = [], []
        forward_, execute_ = e.runner._forward, e.runner.execute

        def forward(ids, pos, rows, ctx):  # prefill steps only (decodes go through _decode_fn)
            # Clones are stream-ordered after the step's copies: they show what the kernels read.
            seen.append((ids.clone(), pos.clone(), ctx.cache_seqlens.clone()))
            return forward_(ids, pos, rows, ctx)

        def execute(batch):
            if not batch.decode_only:
                toks, poss, lens = [], [], []
                for r, n in zip(batch.requests, batch.num_new_tokens):
                    c = r.num_computed_tokens
                    toks += r.token_ids[c : c + n]
                    poss += range(c, c + n)
                    lens.append(c + n)
                expected.append((toks, poss, lens))
            torch.cuda._sleep(200_000_000)  # the GPU lags the host by about 0.1 s, as under a large model
            return execute_(batch)

        e.runner._forward, e.runner.execute = forward, execute
        out = e.generate([prompt], greedy(8), use_tqdm=False)
        torch.cuda.synchronize()
    assert len(seen) == len(expected) >= 5
    for i, ((ids, pos, lens), (t, p, n)) in enumerate(zip(seen, expected)):
        assert ids.tolist() == t and pos.tolist() == p and lens.tolist() == n, f"prefill step {i} read another's"
    assert_greedy_equal(model, prompt, out[0].token_ids, want, NEAR_TIE_GPU)
