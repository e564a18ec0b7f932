"""FlashInfer's decode page table of a step, written by one Triton launch
(``torch_vkv.triton_kernels.decode_page_entries``), against its torch twin
``decode_page_entries_reference`` and against the rules stated by hand: random metadata with bad
slots, lengths and block ids, over a block pool and over a virtual cache. Runs under
``TRITON_INTERPRET=1`` on the CPU (tests/conftest.py) and as itself in ``pytest -m cuda``."""

from __future__ import annotations

import importlib

import pytest
import torch

from torch_vkv.attention import deps

fib = importlib.import_module("torch_vkv.attention.flashinfer_backend")


def _metadata(R, num_slots, max_pages, page_rows, num_blocks, paged, with_slots, seed, device):
    g = torch.Generator().manual_seed(seed)
    max_len = max_pages * page_rows
    lens = torch.randint(-2, max_len + 3, (R,), generator=g, dtype=torch.int32)
    slots = torch.randint(-1, num_slots + 2, (R,), generator=g) if with_slots else None
    table = None
    if paged:  # mostly good ids, some outside the pool on either side
        table = torch.randint(0, num_blocks, (num_slots, max_pages), generator=g, dtype=torch.int32)
        bad = torch.rand(num_slots, max_pages, generator=g) < 0.03
        table[bad] = torch.randint(-5, 5, (int(bad.sum()),), generator=g, dtype=torch.int32) + num_blocks * (
            torch.rand(int(bad.sum()), generator=g) < 0.5).int()  # fmt: skip
        table = table.to(device)
    return lens.to(device), slots.to(device) if slots is not None else None, table, max_len


def _kernel(lens, slots, table, sizes):
    R, dev = lens.shape[0], lens.device
    indices = torch.full((R * sizes["max_pages"],), -99, dtype=torch.int32, device=dev)
    last = torch.full((R,), -99, dtype=torch.int32, device=dev)
    ok = deps.triton_kernels().decode_page_entries(lens, slots, table, indices, last, **sizes)
    return indices, last, ok


def _run(device, paged, with_slots, max_pages, seed):
    R, num_slots, page_rows = 37, 9, 16
    num_blocks = num_slots * max_pages + 5 if paged else 1
    lens, slots, table, max_len = _metadata(R, num_slots, max_pages, page_rows, num_blocks, paged, with_slots, seed,
                                            device)  # fmt: skip
    sizes = dict(num_slots=num_slots, max_len=max_len, num_blocks=num_blocks, page_rows=page_rows,
                 pages_per_slot=max_pages + 3, max_pages=max_pages)  # fmt: skip
    got = _kernel(lens, slots, table, sizes)
    want = fib.decode_page_entries_reference(lens, slots, table, **sizes)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu())
    # The rules by hand, request by request.
    indices, last, ok = (t.cpu().tolist() for t in want)
    for r in range(R):
        length = int(lens[r])
        slot = int(slots[r]) if slots is not None else r
        good = 0 <= slot < num_slots and 1 <= length <= max_len
        row = slot if good else 0
        ids = table[row].cpu().tolist() if paged else [row * (max_pages + 3) + j for j in range(max_pages)]
        if paged:
            good = good and all(0 <= ids[j] < num_blocks for j in range(-(-length // page_rows)))
            ids = [min(max(i, 0), num_blocks - 1) for i in ids]  # reads stay in the pool
        assert ok[r] == good
        assert indices[r * max_pages : (r + 1) * max_pages] == ids
        # FlashInfer's length of the request: (pages - 1) * page_rows + last_page_len.
        assert (max_pages - 1) * page_rows + last[r] == (length if good else 0)
    assert 0 < sum(ok) < R  # the random metadata has good and bad requests alike


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("with_slots", [True, False])
@pytest.mark.parametrize("max_pages", [1, 6, 1500])  # 1500: more pages than one block of the kernel
def test_decode_page_entries_cpu(paged, with_slots, max_pages):
    if not deps.triton_usable(torch.device("cpu")):
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    for seed in range(3):
        _run("cpu", paged, with_slots, max_pages, seed)


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [True, False])
def test_decode_page_entries_cuda(paged):
    for seed in range(3):
        _run("cuda", paged, True, 256, seed)


def test_empty_batch_writes_nothing():
    if not deps.triton_usable(torch.device("cpu")):
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    empty = torch.empty(0, dtype=torch.int32)
    sizes = dict(num_slots=2, max_len=32, num_blocks=1, page_rows=16, pages_per_slot=2, max_pages=2)
    indices, last, ok = _kernel(empty, None, None, sizes)
    assert ok.shape == (0,) and indices.numel() == 0 and last.numel() == 0
