"""Parameter shapes of real models, from their published configs (nn.Linear convention:
(out_features, in_features)). Only shapes and counts: the benchmarks allocate random
tensors of these shapes.

Each entry: (shape, count, kind) with kind one of "matrix" (hidden matrix: the matrix rule),
"embedding", "head" (AdamW under split_params) and "vector" (norm gains, biases: AdamW).
"""

from __future__ import annotations

ParamSpec = tuple[tuple[int, ...], int, str]


def gpt2(n_layer: int, d: int, vocab: int = 50257, ctx: int = 1024) -> list[ParamSpec]:
    """GPT-2 (small: 12 x 768, medium: 24 x 1024); the head is tied to the token embedding."""
    return [
        ((vocab, d), 1, "embedding"),
        ((ctx, d), 1, "embedding"),
        ((3 * d, d), n_layer, "matrix"),  # attn.c_attn (q, k, v)
        ((d, d), n_layer, "matrix"),  # attn.c_proj
        ((4 * d, d), n_layer, "matrix"),  # mlp.c_fc
        ((d, 4 * d), n_layer, "matrix"),  # mlp.c_proj
        ((3 * d,), n_layer, "vector"),
        ((d,), n_layer * 6 + 2, "vector"),  # ln_1, ln_2 (gain, bias), attn and mlp out biases; ln_f
        ((4 * d,), n_layer, "vector"),
    ]


def qwen3_0p6b() -> list[ParamSpec]:
    """Qwen3-0.6B: 28 layers, hidden 1024, 16 query heads and 8 KV heads of 128, MLP 3072,
    vocab 151936 with tied embeddings, q/k RMSNorm of 128."""
    layers, d, head_dim, mlp = 28, 1024, 128, 3072
    return [
        ((151936, d), 1, "embedding"),
        ((16 * head_dim, d), layers, "matrix"),  # q_proj
        ((8 * head_dim, d), 2 * layers, "matrix"),  # k_proj, v_proj
        ((d, 16 * head_dim), layers, "matrix"),  # o_proj
        ((mlp, d), 2 * layers, "matrix"),  # gate_proj, up_proj
        ((d, mlp), layers, "matrix"),  # down_proj
        ((head_dim,), 2 * layers, "vector"),
        ((d,), 2 * layers + 1, "vector"),
    ]


def llama3_2_1b() -> list[ParamSpec]:
    """Llama-3.2-1B: 16 layers, hidden 2048, 32 query heads and 8 KV heads of 64, MLP 8192,
    vocab 128256 with tied embeddings."""
    layers, d, head_dim, mlp = 16, 2048, 64, 8192
    return [
        ((128256, d), 1, "embedding"),
        ((32 * head_dim, d), layers, "matrix"),  # q_proj
        ((8 * head_dim, d), 2 * layers, "matrix"),  # k_proj, v_proj
        ((d, 32 * head_dim), layers, "matrix"),  # o_proj
        ((mlp, d), 2 * layers, "matrix"),  # gate_proj, up_proj
        ((d, mlp), layers, "matrix"),  # down_proj
        ((d,), 2 * layers + 1, "vector"),
    ]


def llama3_8b() -> list[ParamSpec]:
    """Llama-3-8B: 32 layers, hidden 4096, 32 query heads and 8 KV heads of 128, MLP 14336,
    vocab 128256, untied head. (Not in ``MODELS``: the step benchmarks would allocate 8B
    parameters; bench/ns_flops.py uses it for arithmetic only.)"""
    layers, d, head_dim, mlp = 32, 4096, 128, 14336
    return [
        ((128256, d), 1, "embedding"),
        ((32 * head_dim, d), layers, "matrix"),  # q_proj
        ((8 * head_dim, d), 2 * layers, "matrix"),  # k_proj, v_proj
        ((d, 32 * head_dim), layers, "matrix"),  # o_proj
        ((mlp, d), 2 * layers, "matrix"),  # gate_proj, up_proj
        ((d, mlp), layers, "matrix"),  # down_proj
        ((128256, d), 1, "head"),
        ((d,), 2 * layers + 1, "vector"),
    ]


def vit_base(classes: int = 1000) -> list[ParamSpec]:
    """ViT-B/16: 12 layers of 768, MLP 3072, 16x16 patches, 197 tokens."""
    layers, d = 12, 768
    return [
        ((d, 3, 16, 16), 1, "embedding"),  # patch embedding (a conv kernel)
        ((1, 197, d), 1, "embedding"),  # position embedding
        ((3 * d, d), layers, "matrix"),
        ((d, d), layers, "matrix"),
        ((4 * d, d), layers, "matrix"),
        ((d, 4 * d), layers, "matrix"),
        ((classes, d), 1, "head"),
        ((3 * d,), layers, "vector"),
        ((d,), layers * 6 + 3, "vector"),
        ((4 * d,), layers, "vector"),
    ]


MODELS: dict[str, list[ParamSpec]] = {
    "gpt2-small": gpt2(12, 768),
    "gpt2-medium": gpt2(24, 1024),
    "qwen3-0.6b": qwen3_0p6b(),
    "llama3.2-1b": llama3_2_1b(),
    "vit-base": vit_base(),
}

# A model of the same structure, small enough for a CPU run in CI.
MODELS_CI: dict[str, list[ParamSpec]] = {
    "gpt2-tiny": gpt2(2, 64, vocab=512, ctx=64),
}

SQUARE_SIZES = (1024, 2048, 4096, 8192)
SQUARE_SIZES_CI = (64, 96)


def param_count(specs: list[ParamSpec]) -> int:
    total = 0
    for shape, count, _ in specs:
        n = 1
        for s in shape:
            n *= s
        total += n * count
    return total
