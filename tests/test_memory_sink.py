"""The in-memory sink, the Run views (run[hook], stack, integer ids) on every reader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dmi
from dmi import plugins
from dmi.reader.memory import cache_of
from dmi.sinks.base import HookInfo, RowBlock, RunMeta
from dmi.sinks.memory import MemorySink
from dmi.testing import run_read_back, run_sink_conformance
from helpers import assert_books_balance, fed_sequences, left_pad

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33]]
PAD, NO_EOS = 257, 319


def test_memory_sink_conformance(tmp_path):
    sinks = {}

    def make(d):
        sinks[d] = MemorySink(max_bytes=1 << 30)
        return sinks[d]

    run_sink_conformance(make, lambda d: run_read_back(sinks[d].run()), tmp_path)


def test_registered_by_name_and_by_kind():
    assert isinstance(plugins.sink_for("memory"), MemorySink)
    s = plugins.sink_for({"kind": "memory", "max_bytes": 1234})
    assert isinstance(s, MemorySink) and s.max_bytes == 1234
    with pytest.raises(ValueError, match="max_bytes"):
        plugins.sink_for({"kind": "memory", "max_bytes": 0})
    with pytest.raises(ValueError, match="valid: kind, max_bytes"):
        plugins.sink_for({"kind": "memory", "max_byte": 10})


def _meta():
    return RunMeta(dmi_version="0", engine="t", model="m", model_config={}, spec_json=dmi.CaptureSpec().to_json())


def test_budget_refuses_rows_as_gaps_and_moves_them_to_dropped():
    info = HookInfo("blocks.0.hook_resid_post", "float32", (4,))
    sink = MemorySink(max_bytes=5 * 16)   # room for 5 rows of 16 bytes
    sink.open(_meta())
    data = np.arange(32, dtype=np.float32).reshape(8, 4)
    sink.write(RowBlock(info, data, ["a"] * 4 + ["b"] * 4, np.r_[0:4, 0:4], np.zeros(8, np.int64)))
    sink.close({"hooks": {info.name: {"produced": 8, "filtered": 0, "written": 8, "dropped": 0, "in_flight": 0}}})
    run = sink.run()
    assert torch.equal(run.get(info.name, "a"), torch.from_numpy(data[:4]))
    assert torch.equal(run.get(info.name, "b"), torch.from_numpy(data[4:5]))
    assert [(g["request"], g["position"], g["reason"]) for g in run.gaps()] == \
        [("b", 1, "memory_budget"), ("b", 2, "memory_budget"), ("b", 3, "memory_budget")]
    counters = run.stats["hooks"][info.name]
    assert (counters["written"], counters["dropped"]) == (5, 3)
    assert run.stats["memory"] == {"max_bytes": 80, "bytes": 80, "refused_rows": 3}
    assert_books_balance(run.stats)


def test_notebook_capture_in_memory_then_stack(load):
    """Capture in memory, read it TransformerLens-style, and the batched view equals the gets."""
    model = load("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    spec = dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post", "hook_logits", "blocks.0.attn.hook_pattern"],
                           sink="memory")
    with dmi.attach(model, spec) as session:
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             pad_token_id=PAD, eos_token_id=NO_EOS)
        live = cache_of(session)                   # readable while the session is open
        assert live.requests == ["0", "1", "2"]
    cache = cache_of(session)
    assert cache.complete and cache.requests == ["0", "1", "2"]
    assert_books_balance(cache.stats)
    seqs = fed_sequences(gen, PROMPTS)
    hook = "blocks.1.hook_resid_post"
    values, valid = cache.stack(hook)
    assert values.shape == (3, max(map(len, seqs)), model.config.hidden_size)
    for i, r in enumerate(cache.requests):
        n = len(seqs[i])
        assert valid[i].tolist() == [True] * n + [False] * (values.shape[1] - n)
        assert torch.equal(values[i, :n], cache.get(hook, r))
        assert torch.equal(values[i, :n], cache[hook, r]) and torch.equal(values[i, :n], cache[hook, int(r)])
        assert (values[i, n:] == 0).all()
    # logits start at the last prompt token: aligned by position, the prompt slots are masked.
    logits, lmask = cache.stack("hook_logits", requests=[2, "0"])
    assert lmask[0].nonzero().flatten().tolist() == list(range(len(PROMPTS[2]) - 1, len(seqs[2])))
    assert torch.equal(logits[0][lmask[0]], cache.get("hook_logits", "2"))
    packed, pmask = cache.stack("hook_logits", requests=["2"], align="row")
    assert torch.equal(packed[0][pmask[0]], cache.get("hook_logits", "2"))
    pattern, _ = cache.stack("blocks.0.attn.hook_pattern")   # ragged rows padded to the widest
    assert torch.equal(pattern[1, :len(seqs[1]), :, :len(seqs[1])], cache.get("blocks.0.attn.hook_pattern", "1"))
    # the same model, captured to a file, reads back identically through the same API
    with pytest.raises(KeyError, match="exactly one request"):
        cache[hook]


def test_same_views_on_a_file_and_integer_ids(load, out):
    model = load("qwen3")
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=out)) as s:
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    run = dmi.open(out)
    assert run.requests == ["0"]
    one = run["blocks.0.hook_resid_post"]
    assert one.shape == (4, model.config.hidden_size)
    assert torch.equal(one, run.get("blocks.0.hook_resid_post", 0))
    assert torch.equal(cache_of(s)["blocks.0.hook_resid_post"], one)   # a closed file session reads its file
    values, valid = run.stack("blocks.0.hook_resid_post")
    assert valid.all() and torch.equal(values[0], one)
    with pytest.raises(KeyError, match="no request has the id 3"):
        run.get("blocks.0.hook_resid_post", 3)
    with pytest.raises(TypeError, match="str id or an int"):
        run.get("blocks.0.hook_resid_post", 1.0)


def test_integer_id_refused_when_ambiguous():
    info = HookInfo("h", "float32", (1,))
    sink = MemorySink()
    sink.open(_meta())
    sink.write(RowBlock(info, np.ones((2, 1), np.float32), ["1", "01"], np.zeros(2, np.int64), np.zeros(2, np.int64)))
    run = sink.run()
    with pytest.raises(KeyError, match="ambiguous"):
        run.get("h", 1)
    assert run.get("h", "01").shape == (1, 1)
