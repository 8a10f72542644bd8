"""`dmi hooks MODEL_DIR` lists what a model offers and how each hook was found."""
from __future__ import annotations

from dmi.cli import main
from families import tiny_family_model


def test_hooks_lists_offered_and_missing_with_how(tmp_path, capsys):
    tiny_family_model("gpt_neox").save_pretrained(tmp_path / "neox")
    assert main(["hooks", str(tmp_path / "neox")]) == 0
    out = capsys.readouterr().out
    assert "all taps from the structure" in out
    assert "blocks.{L}.attn.hook_q" in out and "fused projection 'query_key_value'" in out
    assert "blocks.{L}.ln2.hook_normalized" in out and "'post_attention_layernorm' input, normalized as LayerNorm" in out
    assert "hook_resid_mid: attention and MLP run in parallel" in out  # parallel blocks have none


def test_hooks_on_a_folder_without_a_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["hooks", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err
