"""``bench kernels --batches/--contexts``: the decode section's grid from the command line (no GPU needed)."""

import pytest

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


@pytest.mark.parametrize("text", ["", "8,,16", "8,x", "0,8", "-4"])
def test_bad_batches_are_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as e:
        _config("--quick", "--batches", text)
    assert e.value.code == 2
    assert "expected" in capsys.readouterr().err
