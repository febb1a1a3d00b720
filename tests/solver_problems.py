"""Small layer problems shared by the solver tests."""

import itertools

import numpy as np


def correlated_problem(rng, d_out, d_in, tokens=None, dtype=np.float64):
    """Weights and a Gram matrix from correlated activations with a few large channels."""
    tokens = tokens or 4 * d_in
    mixing = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = mixing @ rng.normal(size=(d_in, tokens))
    x[: max(1, d_in // 8)] *= 4.0  # outlier channels, as in LLM activations
    gram = x @ x.T
    weight = rng.normal(size=(d_out, d_in))
    return weight.astype(dtype), gram.astype(dtype)


def row_error(w, gram, m):
    r = w * (1 - m)
    return float(r @ gram @ r)


def all_row_masks(d_in, k):
    for combo in itertools.combinations(range(d_in), k):
        m = np.zeros(d_in)
        m[list(combo)] = 1
        yield m


def best_row_error(w, gram, k):
    return min(row_error(w, gram, m) for m in all_row_masks(d_in=w.size, k=k))


def best_nm_row_error(w, gram, n, m):
    """Exhaustive over the product of per-block choices."""
    blocks = [list(itertools.combinations(range(b, b + m), n)) for b in range(0, w.size, m)]
    best = np.inf
    for choice in itertools.product(*blocks):
        mask = np.zeros(w.size)
        for c in choice:
            mask[list(c)] = 1
        best = min(best, row_error(w, gram, mask))
    return best


def best_layer_error(weight, gram, total):
    d_out, d_in = weight.shape
    best = np.inf
    for combo in itertools.combinations(range(d_out * d_in), total):
        mask = np.zeros(d_out * d_in)
        mask[list(combo)] = 1
        mask = mask.reshape(d_out, d_in)
        best = min(best, sum(row_error(weight[i], gram, mask[i]) for i in range(d_out)))
    return best
