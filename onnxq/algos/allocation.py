"""Per-layer bit-width allocation under a size budget.

Input: for each layer l and candidate c, a cost (measured increase of the network's output
divergence when layer l alone is quantized with c bits) and a size in bits. Two allocators:

`anneal` (DQA-style): each layer holds a softmax attention over its candidates; the expected
cost sum_l sum_c pi_lc cost_lc is minimised subject to the expected size meeting the budget
(a Lagrange multiplier found by dual ascent), while the temperature anneals the attention
toward one choice per layer.
`greedy`: start from the largest candidate everywhere and repeatedly take the downgrade with
the least cost increase per bit saved until the budget holds.
"""

from __future__ import annotations

import numpy as np


DUAL_STEP = 2.0    # anneal: step of the size constraint's multiplier per unit of relative excess


def _fits(sizes: np.ndarray, choice: np.ndarray, budget: float) -> bool:
    return float(sizes[np.arange(len(choice)), choice].sum()) <= budget + 1e-9


def greedy(costs: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
    """costs, sizes [L, C] with candidates sorted by decreasing size. -> choice index [L]."""
    n_layers, n_choices = costs.shape
    choice = np.zeros(n_layers, dtype=int)
    while not _fits(sizes, choice, budget):
        best, best_ratio = None, np.inf
        for layer in range(n_layers):
            c = choice[layer]
            if c + 1 >= n_choices:
                continue
            saved = sizes[layer, c] - sizes[layer, c + 1]
            ratio = (costs[layer, c + 1] - costs[layer, c]) / max(saved, 1e-12)
            if ratio < best_ratio:
                best, best_ratio = layer, ratio
        if best is None:
            break                          # even the smallest choice everywhere does not fit
        choice[best] += 1
    return choice


def repair(costs: np.ndarray, sizes: np.ndarray, budget: float, choice: np.ndarray) -> np.ndarray:
    """Make a choice fit by greedy downgrades, then spend any slack on the best upgrades."""
    choice = choice.copy()
    n_layers, n_choices = costs.shape
    while not _fits(sizes, choice, budget):
        options = [((costs[l, choice[l] + 1] - costs[l, choice[l]]) /
                    max(sizes[l, choice[l]] - sizes[l, choice[l] + 1], 1e-12), l)
                   for l in range(n_layers) if choice[l] + 1 < n_choices]
        if not options:
            break
        choice[min(options)[1]] += 1
    while True:
        used = float(sizes[np.arange(n_layers), choice].sum())
        options = [((costs[l, choice[l]] - costs[l, choice[l] - 1]) /
                    max(sizes[l, choice[l] - 1] - sizes[l, choice[l]], 1e-12), l)
                   for l in range(n_layers) if choice[l] > 0
                   and used + sizes[l, choice[l] - 1] - sizes[l, choice[l]] <= budget + 1e-9
                   and costs[l, choice[l] - 1] < costs[l, choice[l]]]
        if not options:
            return choice
        choice[max(options)[1]] -= 1


def anneal(costs: np.ndarray, sizes: np.ndarray, budget: float, steps: int = 400,
           t_start: float = 1.0, t_end: float = 0.01, lr: float = 0.5,
           rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (choice [L], final attention [L, C])."""
    rng = rng or np.random.default_rng(0)
    c_scale = max(float(np.abs(costs).max()), 1e-12)
    s_scale = max(float(sizes.max()), 1e-12)
    cn, sn = costs / c_scale, sizes / s_scale
    bn = budget / s_scale
    logits = 1e-3 * rng.standard_normal(costs.shape)
    lam = 0.0
    for i in range(steps):
        t = t_start * (t_end / t_start) ** (i / max(steps - 1, 1))
        z = logits / t
        pi = np.exp(z - z.max(axis=1, keepdims=True))
        pi /= pi.sum(axis=1, keepdims=True)
        g = cn + lam * sn                                   # per-choice marginal objective
        grad = pi * (g - (pi * g).sum(axis=1, keepdims=True)) / t
        logits -= lr * t * grad / (np.abs(grad).max() * t + 1e-12)
        over = float((pi * sn).sum()) - bn
        lam = max(0.0, lam + DUAL_STEP * over / max(bn, 1e-12))  # dual ascent on the size constraint
    z = logits / t_end
    pi = np.exp(z - z.max(axis=1, keepdims=True))
    pi /= pi.sum(axis=1, keepdims=True)
    return pi.argmax(axis=1), pi


def predicted_cost(costs: np.ndarray, choice: np.ndarray) -> float:
    return float(costs[np.arange(len(choice)), choice].sum())


def allocate_bits(costs: np.ndarray, sizes: np.ndarray, budget: float, method: str = "best",
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, str]:
    """The chosen candidate per layer and which allocator produced it."""
    results = {}
    if method in ("greedy", "best"):
        results["greedy"] = repair(costs, sizes, budget, greedy(costs, sizes, budget))
    if method in ("anneal", "best"):
        results["anneal"] = repair(costs, sizes, budget, anneal(costs, sizes, budget, rng=rng)[0])
    name = min(results, key=lambda k: (predicted_cost(costs, results[k]), k))
    return results[name], name
