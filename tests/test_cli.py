"""python -m torch_vkv {info,demo,bench}: argument handling and the info command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from torch_vkv.cli import main


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend host: memfd + mmap" in out
    assert "backend cuda" in out  # available or the reason it is not


def test_info_takes_no_arguments():
    with pytest.raises(SystemExit) as e:
        main(["info", "--extra"])
    assert e.value.code == 2


def test_unknown_benchmark_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "torch_vkv", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch_vkv" in out.stdout


def test_bench_help_lists_the_benchmarks(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("alloc", "kernels", "hf", "serve")) and "bench NAME --help" in out
    assert main(["bench"]) == 2  # no name: the same help, as an error


@pytest.mark.parametrize("command", [["demo"], ["bench", "serve", "--smoke"], ["bench", "alloc"], ["serve"]])
@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_a_device_this_machine_lacks_is_a_usage_error(command, device, capsys):
    """--device is checked by argparse: exit status 2 and "expected ..., got ...", no traceback."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a cuda:99")
    with pytest.raises(SystemExit) as e:
        main([*command, "--device", device])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "expected" in err and device in err


@pytest.mark.parametrize("command", [["demo"], ["bench", "alloc"], ["bench", "kernels", "--smoke"], ["bench", "hf", "--tiny"],
                                     ["serve"]])
def test_a_device_that_is_no_device_name_says_what_the_command_line_takes(command, capsys):
    """``--device tpu``: the command line takes 'cpu' or 'cuda[:N]'; the message spoke of the Python API
    ("expected None, a torch.device or a string such as ...")."""
    with pytest.raises(SystemExit) as e:
        main([*command, "--device", "tpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: expected 'cpu' or 'cuda[:N]', got 'tpu'" in err and "None" not in err


@pytest.mark.parametrize("command", [["bench", "alloc"], ["bench", "kernels", "--smoke"], ["bench", "serve", "--smoke"],
                                     ["bench", "hf", "--tiny"]])
@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_an_out_folder_that_cannot_be_written_is_a_usage_error(command, where, tmp_path, capsys):
    """--out is checked by argparse before the benchmark runs: exit status 2 and "expected ..., got ...",
    not a FileExistsError traceback after the whole run."""
    (tmp_path / "f").write_text("")
    out = str(tmp_path / "f") if where == "file" else str(tmp_path / "f" / "sub")
    with pytest.raises(SystemExit) as e:
        main([*command, "--out", out])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "expected a writable folder" in err and out in err


@pytest.mark.parametrize("command, option, value", [
    (["demo"], "--batch", "0"),
    (["demo"], "--prompt-len", "0"),
    (["demo"], "--new-tokens", "-1"),
    (["demo"], "--max-cache-len", "0"),
    (["demo"], "--threads", "0"),
    (["demo"], "--page-size", "100"),
    (["demo"], "--page-size", "0"),
    (["bench", "alloc"], "--page-size", "1000"),
    (["bench", "alloc"], "--page-size", "0"),
    (["bench", "alloc"], "--warmup", "-1"),  # was "expected 1 <= min_len <= max_len and warmup >= 0, got ..."
    (["bench", "kernels", "--smoke"], "--window", "-1"),  # was taken as 0 (off): the whole run, exit 0
])
def test_a_bad_count_or_page_size_is_a_usage_error(command, option, value, capsys):
    """Counts and host page sizes are checked by argparse: exit status 2 and "expected ..., got ...", not a
    traceback (min() of an empty batch, transformers' max_new_tokens check, the pool's page size check)."""
    with pytest.raises(SystemExit) as e:
        main([*command, option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "expected" in err and value in err


@pytest.mark.parametrize("args", [
    ["serve", "--model", "{missing}"],
    ["serve", "--model", "{file}"],
    ["serve", "--model", "{dir}", "--tokenizer", "{missing}"],
    ["demo", "--model", "{missing}"],
    ["serve", "--model", "{dir}", "--port", "-1"],
    ["serve", "--model", "{dir}", "--port", "65536"],
])
def test_a_missing_checkpoint_or_a_bad_port_is_a_usage_error(args, tmp_path, capsys):
    """--model / --tokenizer are local folders and --port a TCP port, checked by argparse: exit status 2 and
    "expected ..., got ...", not a Hugging Face hub traceback (or a network lookup) when the model loads."""
    (tmp_path / "file").write_text("")
    paths = {"missing": str(tmp_path / "missing"), "file": str(tmp_path / "file"), "dir": str(tmp_path)}
    args = [a.format(**paths) for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-2]}" in err and "expected" in err and args[-1] in err


@pytest.mark.parametrize("option, value", [("--batch", "0"), ("--prompt", "0"), ("--new-tokens", "-1"),
                                           ("--layers", "0"), ("--max-cache-len", "0")])
def test_bench_hf_bad_counts_are_usage_errors(option, value, capsys):
    """bench hf's sizes are checked by argparse, not a reshape or max_new_tokens traceback from transformers."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "hf", "--tiny", "--device", "cpu", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "expected an int >= 1" in err and value in err


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".."])
def test_bench_hf_report_name_is_a_file_name(name, capsys):
    """``--name ../../x`` wrote the report outside ``--out``; a name with a folder is a usage error."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "hf", "--tiny", "--device", "cpu", "--name", name])
    assert e.value.code == 2
    assert "argument --name: expected a file name without a folder" in capsys.readouterr().err


def test_bench_serve_url_without_a_scheme_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--url", "127.0.0.1:8000"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --url: expected" in err and "'127.0.0.1:8000'" in err


def test_bench_serve_against_no_server_says_so(tmp_path):
    """Nothing listening at --url: one line naming the URL, not an httpx.ConnectError traceback."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--url", "http://127.0.0.1:1", "--num-requests", "1", "--timeout", "5",
              "--out", str(tmp_path)])
    assert isinstance(e.value.code, str) and "http://127.0.0.1:1/v1/models" in e.value.code
    assert "expected" in e.value.code and "ConnectError" in e.value.code


@pytest.mark.parametrize("args, names", [
    (["bench", "alloc", "--device", "cpu", "--pages", "0"], "--pages"),
    (["bench", "alloc", "--device", "cpu", "--dtype", "int8"], "--dtype"),
    (["bench", "alloc", "--device", "cpu", "--q-heads", "3"], "--q-heads"),
    (["bench", "alloc", "--device", "cpu", "--min-len", "9", "--max-len", "4"], "--max-len expected >= --min-len (9), got 4"),
    (["bench", "kernels", "--smoke", "--sections", "nope"], "--sections"),
    (["bench", "kernels", "--smoke", "--models", "nope"], "--models"),  # was ignored with --smoke: exit 0
    (["bench", "serve", "--smoke", "--request-rates", "1,x"], "argument --request-rates"),  # named no option
    (["demo", "--prompt-len", "8", "--new-tokens", "8", "--max-cache-len", "12"], "--max-cache-len"),
    (["demo", "--no-transformers", "--prompt-len", "8", "--new-tokens", "8", "--max-cache-len", "12"],
     "--max-cache-len"),  # was a KVCache ValueError traceback from the decode loop
    (["demo", "--batch", "1", "--prompt-len", "4", "--new-tokens", "2", "--attn", "no_such_attention"], "--attn"),
    (["demo", "--max-cache-len", str(10**11)], "--max-cache-len"),  # a ValueError traceback from generate()
    (["demo", "--no-transformers", "--max-cache-len", str(10**11)], "--max-cache-len"),  # from KVCache(...)
])
def test_a_bad_value_found_after_parsing_is_still_a_usage_error(args, names, capsys):
    """Values that argparse's types cannot check alone (combinations, names looked up later) are refused
    like argparse's own errors: exit status 2 and "error: ... expected ..." on stderr, before anything runs.
    bench alloc / kernels exited with status 1 (or 0: --models with --smoke), demo --attn with transformers'
    ValueError traceback, demo's --max-cache-len check printed to stdout and returned 2 without "error:"."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and names in err and "expected" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    from _tiny_checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("cli_ckpt"))


@pytest.mark.parametrize("extra, names", [
    (["--page-size", "100"], "page_size"),
    (["--kv", "paged", "--page-size", "4096"], "page_size"),
    (["--memory-budget", "1"], "memory_budget"),
    (["--max-seq-len", "1"], "max_seq_len"),
    (["--attention-backend", "flash_attn"], "attention_backend"),
])
def test_serve_options_the_engine_refuses_are_usage_errors(extra, names, tiny_ckpt, capsys):
    """An engine option that the Engine refuses (page size, budget, backend) is a usage error of serve:
    exit status 2 with the engine's "expected ..., got ..." message, not a ValueError traceback, and
    no server starts."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tiny_ckpt), "--port", "0", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and names in err and "expected" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["serve"], ["demo", "--batch", "1", "--prompt-len", "4", "--new-tokens", "2"]])
def test_a_folder_that_is_no_checkpoint_is_a_usage_error(command, tmp_path, capsys):
    """--model naming an existing folder without a checkpoint in it: exit status 2 naming --model, not a
    tokenizer (serve) or AutoConfig (demo) traceback."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit) as e:
        main([*command, "--model", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model" in err and "expected" in err and str(tmp_path) in err
