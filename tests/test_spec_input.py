"""Spec input a new user writes: the README's own spec, shorthands (`ring: n`, integer request
ids), and mistakes that must be refused early, naming the field (issue 18)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

import dmi
from dmi.errors import SinkPathError, SpecError
from dmi.spec import TokenFilter

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_yaml() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "README.md should hold exactly one YAML spec example"
    return blocks[0]


def test_the_readme_spec_attaches_and_captures(load, tmp_path):
    path = tmp_path / "readme.yaml"
    path.write_text(_readme_yaml())
    spec = dmi.CaptureSpec.from_file(path).model_copy(update={"sink": str(tmp_path / "out.h5")})
    assert spec.overload == "degrade" and spec.degrade.fallback.tokens.mode == "last"
    model = load("qwen3")
    prompts = torch.tensor([[i + 1, 7, 8, 9] for i in range(16)])
    with dmi.attach(model, spec):
        model.generate(input_ids=prompts, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # sample 0.25 with seed 7: the requests whose blake2b("7:<id>") falls below a quarter
    chosen = [str(r) for r in range(16)
              if int.from_bytes(hashlib.blake2b(f"7:{r}".encode(), digest_size=8).digest(), "little") / 2**64 < 0.25]
    with dmi.open(tmp_path / "out.h5") as run:
        assert run.requests == chosen and chosen
        for r in chosen:
            assert run.positions("blocks.0.hook_resid_post", r).tolist() == list(range(6))
            assert run.positions("hook_logits", r).tolist() == [3, 4, 5]


@pytest.mark.parametrize("fallback, spec, within", [
    ({"mode": "last"}, {"mode": "all", "positions": [[0, 512]]}, True),   # the README's
    ({"mode": "last"}, {"mode": "prefill"}, True),       # the last prompt row of each prefill
    ({"mode": "decode"}, {"mode": "last"}, True),
    ({"mode": "all"}, {"mode": "decode", "every": 2}, True),  # defaults add no condition
    ({"mode": "prefill"}, {"mode": "decode"}, False),    # keeps no row the spec keeps
    ({"every": 4}, {"every": 2}, True),
    ({"every": 3}, {"every": 2}, False),
    ({"positions": [[10, 20]]}, {"positions": [[0, 64]]}, True),
    ({"positions": [[0, 1024]]}, {"positions": [[0, 512]]}, False),
    ({"positions": [[0, 10]]}, {"mode": "all"}, True),
])
def test_fallback_tokens_within_the_spec(fallback, spec, within):
    fb, sp = TokenFilter(**fallback), TokenFilter(**spec)
    assert fb.is_subset_of(sp) is within
    reason = fb.why_not_within(sp)
    assert (reason is None) is within
    if not within:
        assert any(word in reason for word in ("mode", "every", "positions"))


def test_shorthands_ring_bytes_and_integer_request_ids():
    spec = dmi.CaptureSpec.parse({"ring": 1000000, "requests": {"ids": [0, 1, "x"]}})
    assert spec.ring.bytes == 1000000
    assert spec.requests.ids == ["0", "1", "x"]
    assert dmi.CaptureSpec.parse({"requests": {"ids": 3}}).requests.ids == ["3"]


@pytest.mark.parametrize("spec, field, words", [
    ({"sink": None}, "sink", ["no sink given", "out.h5"]),
    ({"sink": 5}, "sink", ["path"]),
    ({"ring": True}, "ring", ["size in bytes"]),
    ({"ring": "big"}, "ring", ["size in bytes"]),
    ({"requests": {"ids": [[1]]}}, "requests.ids", ["strings"]),
    ({"requests": {"ids": [True]}}, "requests.ids", ["strings"]),
    ({"tokens": {"positions": [[0, 2**64]]}}, "tokens.positions", ["less than or equal"]),
    ({"tokens": {"every": 2**63}}, "tokens.every", ["less than or equal"]),
    ({"drain": {"schedule": "lazy"}}, "drain.schedule", ["'stream'", "'pause'"]),
    ({"drain": {"max_delay_s": 0}}, "drain.max_delay_s", ["greater than 0"]),
])
def test_bad_values_name_the_field(spec, field, words):
    with pytest.raises(SpecError) as e:
        dmi.CaptureSpec.parse(spec)
    assert e.value.field == field
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "Value error," not in str(e.value)


def test_a_ring_larger_than_memory_is_refused_before_allocating(load, tmp_path):
    model = load("qwen3")
    out = tmp_path / "x.h5"
    with pytest.raises(SpecError) as e:
        dmi.attach(model, {"hooks": ["hook_logits"], "ring": {"bytes": 2**50}, "sink": str(out)})
    msg = str(e.value)
    assert e.value.field == "ring.bytes"
    assert str(2**50) in msg and "1.0 PiB" in msg and "available" in msg
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    said = int(re.search(r"MemAvailable\): (\d+) bytes", msg).group(1))
    assert abs(said - int(meminfo["MemAvailable"].split()[0]) * 1024) < 2**30  # what the host has free
    assert not out.exists()
    with dmi.attach(model, {"hooks": ["hook_logits"], "ring": 1 << 20, "sink": str(out)}):
        pass


@pytest.mark.parametrize("suffix, text, key", [
    (".yaml", "hooks: [resid]\ntokens: all\nhooks: [hook_logits]\n", "hooks"),
    (".yaml", "hooks: [resid]\ntokens: {mode: all, mode: last}\n", "mode"),
    (".json", '{"hooks": ["resid"], "sink": "a.h5", "sink": "b.h5"}', "sink"),
])
def test_duplicate_keys_are_refused(tmp_path, suffix, text, key):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        dmi.CaptureSpec.from_file(path)
    assert e.value.field == key and "given twice" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(SpecError, match="given twice"):
        dmi.CaptureSpec.parse(text) if suffix == ".json" else dmi.CaptureSpec.parse(path)


def test_yaml_merge_keys_and_plain_specs_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("tokens: &t {mode: last, every: 2}\nring: 4096\nsink: o.h5\n"
                    "overload: degrade\ndegrade: {fallback: {hooks: [hook_logits], tokens: {<<: *t, every: 4}}}\n")
    spec = dmi.CaptureSpec.from_file(path)
    assert spec.tokens.mode == "last" and spec.ring.bytes == 4096
    assert (spec.degrade.fallback.tokens.mode, spec.degrade.fallback.tokens.every) == ("last", 4)


def test_a_sink_path_still_open_for_reading_is_named(load, tmp_path):
    model = load("qwen3")
    out = tmp_path / "run.h5"
    with dmi.attach(model, {"hooks": ["hook_logits"], "sink": str(out)}):
        model(torch.tensor([[1, 2, 3]]))
    reader = dmi.open(out)
    with pytest.raises(SinkPathError) as e:
        dmi.attach(model, {"hooks": ["hook_logits"], "sink": str(out)})
    assert str(out) in str(e.value) and "still has it open" in str(e.value)
    assert reader.requests == ["0"]  # the reader was left alone
    reader.close()
    with dmi.attach(model, {"hooks": ["hook_logits"], "sink": str(out), "overwrite": True}):
        pass  # once the reader is gone, replacing the run is allowed when asked
