"""Two toy algorithms registered by tests/verify/test_registry.py, in the test process and in every rank
(tests/verify/dist_ranks.py).

``lazy-dsgd`` (gossip): ``w_j <- (w_j + sum_k P_jk w_k) / 2 - lr g_j``; ``half-csgd`` (centralised):
``w <- w - (lr / 2) mean_j g_j(w)``. Each is one :class:`verify.algorithms.Algorithm` record and nothing else.
"""

from verify.algorithms import Algorithm, State, register


def lazy_dsgd(state, grads, mix, lr, cfg):
    G, losses, buffers = grads(state.W, state.buffers)
    return State(0.5 * (state.W + mix(state.W)) - lr * G, buffers, None, state.step + 1), losses


def half_csgd(state, grads, mix, lr, cfg):
    G, losses, buffers = grads(state.W, state.buffers)
    w = state.W[0] - 0.5 * lr * G.mean(0)
    return State(w.expand_as(state.W).clone(), buffers, None, state.step + 1), losses


TOYS = [
    Algorithm("lazy-dsgd", lazy_dsgd, "gossip", "lazy D-SGD", "w_j <- (w_j + (P W)_j) / 2 - lr g_j"),
    Algorithm("half-csgd", half_csgd, "centralised", "half C-SGD", "w <- w - lr/2 mean_j g_j", reduce=(0,)),
]


def register_toys() -> None:
    for toy in TOYS:
        register(toy)
