"""The one FLOPs formula of a transformer block: the runtime's counts, calibration and the token maps price
their token counts with it."""
from __future__ import annotations


def matmul_flops(tokens: float, query_key_pairs: float, width: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of a block: 2 (4 + 2 mlp_ratio) C^2 per token through the linear layers, 4 C per
    query-key pair in attention."""
    return 2.0 * (4.0 + 2.0 * mlp_ratio) * width * width * tokens + 4.0 * width * query_key_pairs


def block_flops(n_tokens: float, width: int, mlp_ratio: float = 4.0, n_keys: float | None = None) -> float:
    """matmul_flops of one block on one sequence; `n_keys` (default n_tokens): keys per query (CAT's pruned
    queries see every key)."""
    return matmul_flops(n_tokens, n_tokens * (n_tokens if n_keys is None else n_keys), width, mlp_ratio)
