"""Selection criteria against independent reference implementations."""
from __future__ import annotations

import pytest
import torch

from dgmr import DgmrError, select_neurons
from dgmr.prune import criteria, pivot
from dgmr.prune.criteria import CRITERIA, register_criterion


def naive_greedy(w: torch.Tensor, k: int) -> torch.Tensor:
    """method.md section 2 written as plainly as possible (float64): pick the largest residual,
    project it out of every remaining residual, repeat; new round from the original rows."""
    w = w.double()
    h, d = w.shape
    kept: list[int] = []
    while len(kept) < k:
        rest = [i for i in range(h) if i not in kept]
        r = w[rest].clone()
        alive = torch.ones(len(rest), dtype=torch.bool)
        for _ in range(min(d, len(rest), k - len(kept))):
            norms = (r * r).sum(1)
            norms[~alive] = -1.0
            p = int(torch.argmax(norms))
            kept.append(rest[p])
            alive[p] = False
            q = r[p] / r[p].norm()
            r -= torch.outer(r @ q, q)
    return torch.tensor(kept)


SHAPES_K = [
    ((64, 16), 5),      # k < d
    ((64, 16), 16),     # k = d: one full round
    ((64, 16), 40),     # k > d: three rounds (16 + 16 + 8)
    ((64, 16), 64),     # k = h: everything
    ((48, 48), 30),     # square, k < d
    ((48, 48), 48),     # square, k = h = d
    ((300, 64), 200),   # tall, several rounds
    ((20, 50), 12),     # wide (h < d): one round covers every row
]


@pytest.mark.parametrize("shape,k", SHAPES_K)
def test_diversity_equals_naive_greedy_loop(shape, k):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    ref = naive_greedy(w, k)
    got = select_neurons(w, k, "diversity")
    assert torch.equal(got, torch.sort(ref).values)
    # the order within a round is the greedy order too
    order = criteria.diversity(w.clone(), k)
    assert torch.equal(order, ref)


def test_diversity_at_vit_b_layer_shape():
    w = torch.randn(3072, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = naive_greedy(w[:, :96].contiguous(), 200)  # naive loop is slow: check a 3072x96 slice, 3 rounds
    assert torch.equal(select_neurons(w[:, :96], 200), torch.sort(ref).values)


def test_first_round_is_pivoted_qr_of_w_transposed():
    import scipy.linalg

    w = torch.randn(256, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, _, piv = scipy.linalg.qr(w.T.numpy(), pivoting=True)
    assert torch.equal(pivot.pivot_order(w, 32), torch.from_numpy(piv[:32]).long())
    assert torch.equal(w, torch.randn(256, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64))  # untouched


def test_low_precision_weights_are_scored_in_float64():
    w = torch.randn(128, 32, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    got = select_neurons(w, 48)
    assert torch.equal(got, torch.sort(naive_greedy(w.double(), 48)).values)


def test_gated_scoring_uses_gate_and_up_rows_together():
    g = torch.Generator().manual_seed(7)
    up, gate = torch.randn(96, 16, generator=g, dtype=torch.float64), torch.randn(96, 16, generator=g, dtype=torch.float64)
    got = select_neurons(up, 40, w_gate=gate)
    assert torch.equal(got, torch.sort(naive_greedy(torch.cat([gate, up], 1), 40)).values)
    # a round holds 2d = 32 picks on the concatenation, not d
    assert torch.equal(got, torch.sort(criteria.diversity(torch.cat([gate, up], 1), 40)).values)
    assert not torch.equal(got, select_neurons(up, 40))  # the gate matters


def test_gated_neurons_kept_as_pairs_in_packed_layout():
    from dgmr.models.sites.mlp import find_mlps, shrink_mlp
    from timm.layers import SwiGLUPacked

    torch.manual_seed(0)
    mlp = SwiGLUPacked(16, 64)  # fc1 holds [gate(32); up(32)], fc2 reads 32
    site = find_mlps(torch.nn.ModuleDict({"mlp": mlp}))[0]
    assert site.packed == "gate_first" and site.hidden == 32
    w = mlp.fc1.weight.detach().clone()
    up, gate = site.scoring_weights()
    assert torch.equal(gate, w[:32]) and torch.equal(up, w[32:])
    keep = select_neurons(up, 10, w_gate=gate)
    x = torch.randn(4, 16)
    with torch.no_grad():
        full_hidden = torch.nn.functional.silu(x @ w[:32].T + mlp.fc1.bias[:32]) * (x @ w[32:].T + mlp.fc1.bias[32:])
        expect = full_hidden[:, keep] @ mlp.fc2.weight[:, keep].T + mlp.fc2.bias
        shrink_mlp(site, keep)
        torch.testing.assert_close(mlp(x), expect)
    assert mlp.fc1.weight.shape == (20, 16) and mlp.fc2.weight.shape == (16, 10)


def test_l2_keeps_largest_rows():
    w = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    norms = w.norm(dim=1)
    got = select_neurons(w, 7, "l2")
    assert set(got.tolist()) == set(torch.topk(norms, 7).indices.tolist())


def test_random_is_seeded_and_without_replacement():
    w = torch.randn(100, 8)
    a, b, c = (select_neurons(w, 30, "random", seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 30 and a.min() >= 0 and a.max() < 100


@pytest.mark.parametrize("k", [0, 101, -3])
def test_bad_k_is_a_clear_error(k):
    with pytest.raises(DgmrError, match="cannot keep"):
        select_neurons(torch.randn(100, 8), k)


def test_unknown_criterion_and_bad_weights():
    with pytest.raises(DgmrError, match="unknown criterion"):
        select_neurons(torch.randn(10, 4), 3, "magic")
    with pytest.raises(DgmrError, match="NaN"):
        select_neurons(torch.full((10, 4), float("nan")), 3)
    with pytest.raises(DgmrError, match="meta"):
        select_neurons(torch.empty(10, 4, device="meta"), 3)


def test_adding_a_criterion_is_one_function():
    @register_criterion("last_k_for_test")
    def last_k(w, k, *, seed=0):
        return torch.arange(w.shape[0] - k, w.shape[0])

    try:
        assert select_neurons(torch.randn(10, 4), 3, "last_k_for_test").tolist() == [7, 8, 9]
    finally:
        CRITERIA.remove("last_k_for_test")


@pytest.mark.parametrize("seed", range(4))
def test_diversity_exact_where_float32_cannot_tell_rows_apart(seed):
    """Bounds are refreshed in float32 plus a rigorous rounding allowance. Pairs of rows
    whose residual norms differ by 1e-10 (far below float32 resolution), in a random
    basis so that every float32 dot product rounds, must still be picked in the exact
    float64 greedy order (without the allowance, every seed here picks wrongly)."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    rows = [10 * torch.eye(d, dtype=torch.float64)[0]]
    for i in range(1, d):
        x, y = torch.zeros(2, d, dtype=torch.float64)
        x[0], y[0] = torch.randn(2, generator=g, dtype=torch.float64)
        x[i] = 5.0 - 0.1 * i
        y[i] = -(5.0 - 0.1 * i) * (1 + (1e-10 if seed % 2 else -1e-10))
        rows += [x, y]
    w = torch.stack(rows) @ rot
    assert torch.equal(pivot.pivot_order(w, d, pool=1), naive_greedy(w, d))


def test_diversity_exact_on_bf16_weights_with_many_refreshes():
    wb = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0)).bfloat16().double()
    assert torch.equal(pivot.pivot_order(wb, 64, pool=32), naive_greedy(wb, 64))


@pytest.mark.parametrize("pool,cache", [(4, 4), (8, 64), (64, 8)])
def test_residual_cache_sizes_do_not_change_the_picks(pool, cache):
    """A pool that doubles past the residual cache, a cache that holds every row, a tiny one."""
    w = torch.randn(400, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, _ = pivot._lazy_pivot_order(w, 48, pool=pool, cache=cache)
    assert torch.equal(got, naive_greedy(w, 48))


@pytest.mark.parametrize("shape,k", SHAPES_K)
def test_split_into_the_complement_keeps_the_greedy_order(shape, k, monkeypatch):
    """After 60% of a round's picks the round goes on in the orthogonal complement of the
    picked directions (normally for d >= 512); forced here on small shapes, recursively."""
    monkeypatch.setattr(pivot, "_SPLIT_MIN", 4)
    monkeypatch.setattr(pivot, "_QRCP_MAX", 0)  # small layers would go to geqp3: keep the lazy kernel
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(k + 1), dtype=torch.float64)
    assert torch.equal(criteria.diversity(w, k), naive_greedy(w, k))


def test_split_at_its_real_size():
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(7)).bfloat16().double()
    assert torch.equal(pivot.pivot_order(w, 512), naive_greedy(w, 512))


def test_single_thread_section_restores_the_thread_count_across_threads():
    """Several layers selected at once (threads) must leave torch's thread count as it was."""
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ws = [torch.randn(300, 40, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(6)]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda w: pivot.pivot_order(w, 40, pool=8), ws))
        assert all(torch.equal(g, naive_greedy(w, 40)) for g, w in zip(got, ws))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- the method dispatch and the GPU method (blocked pivoted Cholesky) -----------------------
@pytest.mark.parametrize("shape,n,block", [((300, 40), 40, 16), ((512, 64), 64, 128), ((800, 100), 60, 7),
                                           ((64, 64), 64, 8), ((1000, 24), 24, 5)])
def test_cholesky_order_is_the_greedy_order(shape, n, block):
    """The same code that runs as a CUDA graph on GPUs, here on CPU tensors: its picks equal
    the textbook loop's and LAPACK geqp3's, whatever the block size."""
    g = torch.Generator().manual_seed(n + block)
    w = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.rand(shape[0], 1, generator=g, dtype=torch.float64)
    got = pivot.cholesky_pivot_order(w, n, block=block)
    assert torch.equal(got, naive_greedy(w, n))
    assert torch.equal(got, pivot._qrcp_pivot_order(w, n))


def test_cholesky_on_bf16_weights_and_through_diversity(monkeypatch):
    wb = torch.randn(2048, 64, generator=torch.Generator().manual_seed(3)).bfloat16().double()
    assert torch.equal(pivot.cholesky_pivot_order(wb, 64, block=16), naive_greedy(wb, 64))
    # diversity's rounds (k > d) with the GPU method forced on the CPU
    real = pivot.greedy_order
    monkeypatch.setattr(criteria, "greedy_order", lambda w, n: real(w, n, method="cholesky"))
    w = torch.randn(200, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(criteria.diversity(w, 50), naive_greedy(w, 50))


def test_cholesky_rank_deficient_falls_back_to_geqp3():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
    assert pivot.cholesky_pivot_order(w, 8) is None  # rank 3: picks 4..8 would be rounding noise
    assert torch.equal(pivot.greedy_order(w, 8, method="cholesky"), pivot._qrcp_pivot_order(w, 8))


def test_greedy_order_dispatch(monkeypatch):
    w = torch.randn(96, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    calls = []
    for name in ("pivot_order", "_qrcp_pivot_order", "cholesky_pivot_order"):
        real = getattr(pivot, name)
        monkeypatch.setattr(pivot, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    ref = naive_greedy(w, 12)
    assert torch.equal(pivot.greedy_order(w, 12), ref) and calls == ["_qrcp_pivot_order"]  # small layer: geqp3
    monkeypatch.setattr(pivot, "_QRCP_MAX", 96 * 12 - 1)
    assert torch.equal(pivot.greedy_order(w, 12), ref) and calls[-1] == "pivot_order"  # larger: the lazy kernel
    for method, called in (("lazy", "pivot_order"), ("qrcp", "_qrcp_pivot_order"), ("cholesky", "cholesky_pivot_order")):
        assert torch.equal(pivot.greedy_order(w, 12, method=method), ref) and calls[-1] == called
    half = w.bfloat16()  # LAPACK has no bf16: the methods see float32 copies
    for method in ("auto", "qrcp", "lazy", "cholesky"):
        assert torch.equal(pivot.greedy_order(half, 12, method=method), naive_greedy(half.double(), 12))
    with pytest.raises(ValueError, match="unknown selection method"):
        pivot.greedy_order(w, 12, method="magic")
    with pytest.raises(ValueError, match="at most"):
        pivot.greedy_order(w, 13)


@pytest.mark.cuda
def test_cuda_selection_matches_the_cpu():
    """On a GPU ``auto`` runs the Cholesky method as a CUDA graph: same picks as the CPU's
    float64 lazy kernel and geqp3, and the whole multi-round diversity selection too."""
    w = torch.randn(4096, 512, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cpu = pivot.pivot_order(w, 512)
    assert torch.equal(pivot.greedy_order(w.cuda(), 512), cpu)
    assert torch.equal(cpu, pivot._qrcp_pivot_order(w, 512))
    assert torch.equal(select_neurons(w.cuda(), 1024), select_neurons(w, 1024))
