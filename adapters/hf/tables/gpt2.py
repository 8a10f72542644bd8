from .base import ArchTable, Dims, Tap

H = "transformer.h.{L}"


def gpt2_dims(cfg) -> Dims:
    return Dims(n_layers=cfg.n_layer, hidden=cfg.n_embd, n_heads=cfg.n_head, n_kv_heads=cfg.n_head,
                head_dim=cfg.n_embd // cfg.n_head, intermediate=cfg.n_inner or 4 * cfg.n_embd,
                vocab=cfg.vocab_size)


def _heads(d: Dims):
    return (d.n_heads, d.head_dim)


# GPT-2 fuses q, k and v into one Conv1D (c_attn); the table splits its output in three.
TABLE = ArchTable(
    family="gpt2",
    model_types=("gpt2",),
    layers_path="transformer.h",
    dims=gpt2_dims,
    taps={
        "hook_embed": Tap("transformer.wte"),
        "hook_resid_pre": Tap(H, io="input", index=0, kw="hidden_states"),
        "attn.hook_q": Tap(H + ".attn.c_attn", view="qkv:0", shape=_heads),
        "attn.hook_k": Tap(H + ".attn.c_attn", view="qkv:1", shape=_heads),
        "attn.hook_v": Tap(H + ".attn.c_attn", view="qkv:2", shape=_heads),
        "attn.hook_z": Tap(H + ".attn.c_proj", io="input", index=0, view="heads", shape=_heads),
        "attn.hook_pattern": Tap(H + ".attn", index=1, view="pattern", shape=lambda d: (d.n_heads, 1),
                                 eager_only=True),
        "hook_attn_out": Tap(H + ".attn", index=0),
        "hook_resid_mid": Tap(H + ".ln_2", io="input", index=0),
        "mlp.hook_post": Tap(H + ".mlp.act", shape=lambda d: (d.intermediate,)),
        "hook_mlp_out": Tap(H + ".mlp"),
        "hook_resid_post": Tap(H),
        "hook_logits": Tap("lm_head", shape=lambda d: (d.vocab,)),
    },
)
