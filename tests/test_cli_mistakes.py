"""Every user mistake on the command line: one line on stderr, exit code 2, no traceback, and
no output file left behind (issue 18)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dmi.cli import main

DMI = [sys.executable, "-m", "dmi.cli.main"]


def _main(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits itself
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def files(tmp_path):
    (tmp_path / "text.txt").write_text("hello\nworld\n")
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    return tmp_path


@pytest.mark.parametrize("prompts, extra, words", [
    ("text.txt", [], ["text prompts", "no tokenizer files", "--tokenizer"]),         # model folder without a tokenizer
    ('{"input_ids": []}', [], ["p.jsonl:1", "empty prompt"]),
    ('{"prompt": ""}', [], ["p.jsonl:1", "non-empty"]),
    ('{"input_ids": [1, "a"]}', [], ["p.jsonl:1", "integer token ids"]),
    ('{"input_ids": [1, 100000]}', [], ["token id 100000", "vocabulary"]),
    ("ids.jsonl", ["--batch-size", "0"], ["--batch-size", "at least 1"]),
    ("ids.jsonl", ["--max-new-tokens", "x"], ["--max-new-tokens", "positive integer"]),
    ("ids.jsonl", ["--model", "/missing/model"], ["/missing/model", "no such folder"]),
    ("ids.jsonl", ["--engine", "vllm"], ["--engine", "invalid choice"]),
])
def test_run_mistakes(prompts, extra, words, files, tiny_dirs, capsys):
    if prompts.startswith("{"):
        (files / "p.jsonl").write_text(prompts + "\n")
        prompts = "p.jsonl"
    out = files / "o.h5"
    argv = ["run", "--model", str(tiny_dirs["qwen3"]), "--prompts", str(files / prompts), "--out", str(out), *extra]
    code, _, err = _main(argv, capsys)
    _assert_one_line_error(code, err, *words)
    assert not out.exists(), "a refused run left an output file behind"


def test_model_folder_that_is_not_a_model(files, capsys):
    code, _, err = _main(["run", "--model", str(files), "--prompts", str(files / "ids.jsonl"),
                          "--out", str(files / "o.h5")], capsys)
    _assert_one_line_error(code, err, "not an HF model folder", "config.json")


def test_inspect_mistakes(files, capsys):
    code, _, err = _main(["inspect", str(files / "missing.h5")], capsys)
    _assert_one_line_error(code, err, "missing.h5")
    code, _, err = _main(["inspect", str(files / "text.txt")], capsys)
    _assert_one_line_error(code, err, "text.txt", "HDF5")
    code, _, err = _main(["inspekt", "x"], capsys)
    _assert_one_line_error(code, err, "invalid choice")


def test_inspect_into_a_closed_pipe_is_quiet(tiny_dirs, files, capsys):
    out = files / "o.h5"
    assert _main(["run", "--model", str(tiny_dirs["qwen3"]), "--prompts", str(files / "ids.jsonl"),
                  "--out", str(out), "--quiet", "--max-new-tokens", "2"], capsys)[0] == 0
    # `dmi inspect o.h5 | head -0`: the reader is gone before the summary is written
    p = subprocess.Popen([*DMI, "inspect", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert p.returncode in (0, 141)
