"""Tests for neumeta.tsp: the exact Held-Karp solver against brute force, the heuristic against
Held-Karp, local optimality checked by an independent move enumeration, and input checks."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neumeta.tsp import HELD_KARP_MAX_N, held_karp_path, path_length, solve_open_path


# ---------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------

def euclidean(n, rng):
    """Distances between random points in the unit square."""
    points = rng.random((n, 2))
    return np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))


def l1_vectors(n, rng, dim=16):
    """L1 distances between random vectors: how channel distances are measured."""
    rows = rng.normal(size=(n, dim))
    return np.abs(rows[:, None] - rows[None]).sum(-1)


def random_instance(n, rng, kind):
    return euclidean(n, rng) if kind == "euclidean" else l1_vectors(n, rng)


def channel_like(n, rng, dim=32, noise=0.1):
    """Rows on a noisy smooth 1-D curve, shuffled; returns the distances and the curve order."""
    t = np.sort(rng.random(n))
    freq, phase = rng.uniform(0.5, 3.0, dim), rng.uniform(0, 2 * np.pi, dim)
    rows = np.sin(2 * np.pi * np.outer(t, freq) + phase) + noise * rng.normal(size=(n, dim))
    shuffle = rng.permutation(n)
    rows = rows[shuffle]
    return np.abs(rows[:, None] - rows[None]).sum(-1), np.argsort(shuffle)


def brute_force_length(dist):
    n = len(dist)
    if n < 2:
        return 0.0
    perms = np.array(list(itertools.permutations(range(n))))
    return float(dist[perms[:, :-1], perms[:, 1:]].sum(axis=1).min())


def assert_permutation(order, n):
    order = np.asarray(order)
    assert order.shape == (n,)
    assert np.issubdtype(order.dtype, np.integer)
    assert sorted(order.tolist()) == list(range(n))


# ---------------------------------------------------------------------------------------------
# path_length and Held-Karp
# ---------------------------------------------------------------------------------------------

def test_path_length_sums_consecutive_distances():
    d = np.array([[0, 1, 5], [1, 0, 2], [5, 2, 0]], dtype=float)
    assert path_length(d, [0, 1, 2]) == 3.0
    assert path_length(d, [1, 0, 2]) == 6.0
    assert path_length(d, [2]) == 0.0
    assert path_length(d, []) == 0.0


@pytest.mark.parametrize("n", range(0, 9))
@pytest.mark.parametrize("kind", ["euclidean", "l1"])
def test_held_karp_matches_brute_force(n, kind):
    rng = np.random.default_rng(100 * n + len(kind))
    for _ in range(3):
        d = random_instance(n, rng, kind)
        order = held_karp_path(d)
        assert_permutation(order, n)
        assert path_length(d, order) == pytest.approx(brute_force_length(d), rel=1e-12, abs=1e-12)


def test_held_karp_finds_the_obvious_path():
    # Points on a line, shuffled: the optimum visits them in sorted order (or reversed).
    x = np.array([0.3, 2.0, 0.0, 1.1, 5.0, 0.7, 3.2])
    order = held_karp_path(np.abs(x[:, None] - x[None]))
    assert list(x[order]) in (sorted(x), sorted(x, reverse=True))


def test_held_karp_refuses_large_n():
    d = euclidean(HELD_KARP_MAX_N + 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="solve_open_path"):
        held_karp_path(d)


# ---------------------------------------------------------------------------------------------
# solve_open_path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 13, 40, 150])
def test_solve_returns_a_permutation(n):
    d = l1_vectors(n, np.random.default_rng(n))
    assert_permutation(solve_open_path(d), n)


def test_solve_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    for d in (euclidean(60, rng), l1_vectors(200, rng)):
        assert np.array_equal(solve_open_path(d, seed=3), solve_open_path(d, seed=3))


def test_solve_does_not_modify_its_input():
    d = l1_vectors(30, np.random.default_rng(2))
    copy = d.copy()
    solve_open_path(d)
    assert np.array_equal(d, copy)


def test_gap_to_held_karp_is_below_one_percent():
    rng = np.random.default_rng(7)
    gaps = []
    for trial in range(50):
        n = int(rng.integers(5, HELD_KARP_MAX_N + 1))
        d = random_instance(n, rng, "euclidean" if trial % 2 else "l1")
        optimum = path_length(d, held_karp_path(d))
        found = path_length(d, solve_open_path(d, seed=trial))
        assert found >= optimum - 1e-9 * optimum   # Held-Karp really is a lower bound
        gaps.append(found / optimum - 1)
    assert np.mean(gaps) < 0.01
    assert np.mean(np.array(gaps) < 1e-9) > 0.75   # and exact on most instances


def _moves(order):
    """Every path one 2-opt move or one or-opt move away from ``order``, each with the new edges
    that the solver's neighbour lists must contain for it to try the move. Written
    independently of the solver's bookkeeping (no dummy node, no position offsets).

    2-opt reverses any stretch, prefixes and suffixes included; it is tried when one of its new
    edges joins a node to one of that node's listed neighbours, either way round. Or-opt moves
    a stretch of 1-3 nodes anywhere, either way round; it is tried when an end of the stretch
    gets joined to one of its own listed neighbours. Yields (path, [(node, neighbour), ...]).
    """
    order = list(order)
    n = len(order)
    for i in range(n):
        for j in range(i + 1, n):
            new_edges = []
            if i > 0:
                new_edges += [(order[i - 1], order[j]), (order[j], order[i - 1])]
            if j < n - 1:
                new_edges += [(order[i], order[j + 1]), (order[j + 1], order[i])]
            yield order[:i] + order[i:j + 1][::-1] + order[j + 1:], new_edges
    for length in (1, 2, 3):
        for i in range(n - length + 1):
            segment, rest = order[i:i + length], order[:i] + order[i + length:]
            for j in range(len(rest) + 1):
                for piece in (segment, segment[::-1]):
                    new_edges = []
                    if j > 0:
                        new_edges.append((piece[0], rest[j - 1]))
                    if j < len(rest):
                        new_edges.append((piece[-1], rest[j]))
                    yield rest[:j] + piece + rest[j:], new_edges


def _nearest(d, k):
    far = d + np.diag(np.full(len(d), np.inf))
    return [set(np.argsort(row)[:k].tolist()) for row in far]


@pytest.mark.parametrize("kind", ["euclidean", "l1"])
def test_solution_is_a_local_optimum(kind):
    # With neighbour lists covering every node, no single move may improve the result.
    rng = np.random.default_rng(11)
    for n in (4, 6, 9, 11, 24, 40):
        d = random_instance(n, rng, kind)
        order = solve_open_path(d, max_rounds=0, neighbours=n - 1)
        length = path_length(d, order)
        best_neighbour = min(path_length(d, path) for path, _ in _moves(order))
        assert best_neighbour >= length - 1e-9 * length


@pytest.mark.parametrize("kind", ["euclidean", "l1"])
def test_solution_is_a_local_optimum_for_short_neighbour_lists(kind):
    # With k nearest neighbours per node, no move that joins a node to a listed neighbour may
    # improve the result. Random starts give the search plenty to do.
    rng = np.random.default_rng(12)
    for trial in range(6):
        n, k = 45, 4
        d = random_instance(n, rng, kind)
        order = solve_open_path(d, max_rounds=0, neighbours=k, initial=rng.permutation(n))
        length = path_length(d, order)
        near = _nearest(d, k)
        for path, new_edges in _moves(order):
            if any(c in near[x] for x, c in new_edges):
                assert path_length(d, path) >= length - 1e-9 * length


@pytest.mark.parametrize("initial", [[4, 3, 2, 1, 0, 5, 6, 7, 8, 9],
                                     [0, 1, 2, 3, 4, 9, 8, 7, 6, 5],
                                     [9, 8, 7, 6, 5, 0, 1, 2, 3, 4]])
def test_local_search_reverses_prefixes_and_suffixes(initial):
    # Points 0..9 on a line: each start is one long prefix or suffix reversal from the optimum.
    x = np.arange(10.0)
    d = np.abs(x[:, None] - x[None])
    assert path_length(d, solve_open_path(d, max_rounds=0, initial=initial)) == 9.0


def test_initial_order_is_only_ever_improved():
    rng = np.random.default_rng(13)
    d = l1_vectors(70, rng)
    initial = rng.permutation(70)
    found = solve_open_path(d, max_rounds=0, initial=initial)
    assert path_length(d, found) < path_length(d, initial)
    optimal_line = np.arange(6)
    line = np.abs(optimal_line[:, None] - optimal_line[None]).astype(float)
    assert np.array_equal(solve_open_path(line, initial=optimal_line), optimal_line)


def test_perturbation_rounds_improve_on_plain_local_search():
    rng = np.random.default_rng(14)
    plain = kicked = 0.0
    for _ in range(10):
        d = l1_vectors(60, rng)
        plain += path_length(d, solve_open_path(d, max_rounds=0))
        kicked += path_length(d, solve_open_path(d, max_rounds=20))
    assert kicked < 0.995 * plain


@pytest.mark.parametrize("n", [16, 40, 64, 150])
def test_channel_like_orders_beat_identity_and_random_orders(n):
    rng = np.random.default_rng(n)
    d, curve = channel_like(n, rng)
    found = path_length(d, solve_open_path(d))
    assert found < path_length(d, np.arange(n))
    for _ in range(20):
        assert found < path_length(d, rng.permutation(n))
    # The curve order is near-optimal; the solver should be at least as good, give or take.
    assert found <= 1.01 * path_length(d, curve)


def test_neighbour_lists_do_not_cost_much_quality():
    d = euclidean(120, np.random.default_rng(5))
    narrow = path_length(d, solve_open_path(d, neighbours=8))
    full = path_length(d, solve_open_path(d, neighbours=119))
    assert narrow <= 1.05 * full


def test_more_rounds_never_make_it_worse():
    d = l1_vectors(80, np.random.default_rng(6))
    lengths = [path_length(d, solve_open_path(d, seed=2, max_rounds=r)) for r in (0, 4, 20)]
    assert lengths[0] >= lengths[1] >= lengths[2]


def test_time_limit_still_returns_a_valid_path():
    d = l1_vectors(1500, np.random.default_rng(8))
    order = solve_open_path(d, time_limit=0.05)
    assert_permutation(order, 1500)  # timings live in benchmarks/tsp.py, not in tests


def test_float32_round_off_asymmetry_is_accepted():
    rows = np.random.default_rng(9).normal(size=(20, 50)).astype(np.float32)
    d = np.abs(rows[:, None] - rows[None]).sum(-1)           # float32 sums
    d = d + np.float32(1e-7) * np.triu(d)                    # tiny asymmetry
    assert_permutation(solve_open_path(d), 20)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 7).flatmap(lambda n: st.lists(
    st.integers(0, 5), min_size=n * (n - 1) // 2, max_size=n * (n - 1) // 2).map(
        lambda upper: (n, upper))))
def test_small_integer_matrices_with_ties(case):
    # Many ties and zero distances: both solvers stay valid, Held-Karp matches brute force and
    # the heuristic is never better than the optimum.
    n, upper = case
    d = np.zeros((n, n))
    d[np.triu_indices(n, 1)] = upper
    d = d + d.T
    exact = held_karp_path(d)
    assert_permutation(exact, n)
    assert path_length(d, exact) == brute_force_length(d)
    heuristic = solve_open_path(d)
    assert_permutation(heuristic, n)
    assert path_length(d, heuristic) >= path_length(d, exact)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def _bad_matrices():
    good = l1_vectors(5, np.random.default_rng(0))
    negative = good.copy()
    negative[1, 2] = negative[2, 1] = -1.0
    with_nan = good.copy()
    with_nan[0, 3] = with_nan[3, 0] = np.nan
    with_inf = good.copy()
    with_inf[4, 1] = with_inf[1, 4] = np.inf
    asymmetric = good.copy()
    asymmetric[0, 1] += 1.0
    return [
        (good[:, :4], "square"),
        (good[0], "square"),
        (np.zeros((2, 2, 2)), "square"),
        (negative, "negative"),
        (with_nan, "NaN"),
        (with_inf, "infinite"),
        (asymmetric, "symmetric"),
    ]


@pytest.mark.parametrize("solver", [held_karp_path, solve_open_path])
@pytest.mark.parametrize("matrix, message", _bad_matrices())
def test_invalid_input_raises(solver, matrix, message):
    with pytest.raises(ValueError, match=message):
        solver(matrix)


def test_diagonal_is_ignored():
    d = l1_vectors(25, np.random.default_rng(15))
    with_diagonal = d + np.diag(np.arange(25.0))
    assert np.array_equal(solve_open_path(d), solve_open_path(with_diagonal))
    small = d[:8, :8]
    assert np.array_equal(held_karp_path(small), held_karp_path(small + 3 * np.eye(8)))


@pytest.mark.parametrize("initial", [[0, 1, 2], [0, 1, 2, 3, 3], [0, 1, 2, 3, 5],
                                     [[0, 1, 2, 3, 4]]])
def test_invalid_initial_raises(initial):
    with pytest.raises(ValueError, match="permutation"):
        solve_open_path(euclidean(5, np.random.default_rng(0)), initial=initial)


def test_invalid_neighbours_raises():
    with pytest.raises(ValueError, match="neighbours"):
        solve_open_path(euclidean(5, np.random.default_rng(0)), neighbours=0)
