"""``bench kernels --batches/--contexts/--prefill-contexts``: the decode and prefill sections' grids from the
command line (no GPU needed)."""

import pytest
import torch

from torch_vkv.bench import kernels


def _config(*argv: str):
    return kernels._config(kernels._parser().parse_args(["--no-plots", "--device", "cpu", *argv]))


def test_batches_and_contexts_replace_the_run_sizes_grid():
    default = _config("--quick")
    cfg = _config("--quick", "--batches", "8,16", "--contexts", "4096, 32768")
    assert (cfg.batches, cfg.contexts) == ([8, 16], [4096, 32768])
    assert cfg.step_cases == default.step_cases and cfg.prefill_contexts == default.prefill_contexts
    only_batches = _config("--quick", "--batches", "64")
    assert (only_batches.batches, only_batches.contexts) == ([64], default.contexts)


def test_prefill_contexts_replace_only_the_prefill_lengths():
    default = _config("--quick")
    cfg = _config("--quick", "--prefill-contexts", "8192,131072")
    assert cfg.prefill_contexts == [8192, 131072]
    assert (cfg.batches, cfg.contexts, cfg.vm_prefill) == (default.batches, default.contexts, default.vm_prefill)


@pytest.mark.parametrize("option", ["--batches", "--prefill-contexts"])
@pytest.mark.parametrize("text", ["", "8,,16", "8,x", "0,8", "-4"])
def test_bad_batches_are_a_usage_error(option, text, capsys):
    with pytest.raises(SystemExit) as e:
        _config("--quick", option, text)
    assert e.value.code == 2
    assert "expected" in capsys.readouterr().err


@pytest.mark.parametrize("memory", ["vm", "malloc"])
def test_prefill_caches_have_committed_rows_past_the_keys(memory):
    """The prefill section's caches hold ``margin`` rows past the ``S`` keys, committed, so the
    ``flashinfer`` backend's FA3 check passes as in a server's cache (without them it falls back to FA2)."""
    from torch_vkv.attention.flashinfer_backend import FA3_TILE, fa3_tail_fits

    cfg = _config("--smoke")
    caches = kernels.Caches(cfg, lambda msg: None)
    S = 300
    k, v, keep = caches.contiguous(memory, 1, S, 2, 64, margin=FA3_TILE)
    try:
        assert k.shape == v.shape == (1, S + FA3_TILE, 2, 64)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()  # the margin rows are readable and finite
        if memory == "vm":
            assert fa3_tail_fits(keep.key(0), [S], [0], [True])
            assert not fa3_tail_fits(keep.key(0), [S + 2], [0], [True])  # a tile past the margin: refused
    finally:
        kernels._close(keep)
    k0, _, keep0 = caches.contiguous(memory, 1, S, 2, 64)
    assert k0.shape[1] == S
    kernels._close(keep0)


def test_l2_flush_is_chosen_on_the_command_line(capsys):
    assert _config("--quick").l2_flush == "write"  # do_bench's, as every published row
    assert _config("--quick", "--l2-flush", "read").l2_flush == "read"
    with pytest.raises(SystemExit) as e:
        _config("--quick", "--l2-flush", "none")
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
