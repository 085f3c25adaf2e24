"""Shortest open Hamiltonian path through a distance matrix (the "weight permutation" step).

NeuMeta reorders the channels of each coupled channel group so that neighbouring channels have
similar weights: the INR then sees a smooth function of the channel coordinate. For one group we
have an n x n matrix of distances between channels and want the visiting order (any start, any
end) with the smallest total distance between consecutive channels: an open travelling-salesman
path.

Two solvers:

* ``held_karp_path``: exact dynamic programming over subsets, for n <= 12: the yardstick the
  heuristic is tested against.
* ``solve_open_path``: nearest-neighbour construction, then 2-opt and or-opt local search, then
  a few perturb-and-repair rounds (iterated local search). Float distances are used as they
  are, never rounded.

The open path is handled by the usual dummy-node trick, written out explicitly: the path is
stored between two copies of a dummy node ``n`` that is at distance 0 from everything, so
``q = [n, p_0, ..., p_{n-1}, n]`` and edge ``t`` joins ``q[t]`` and ``q[t + 1]``. Every move
then is an ordinary closed-tour move that never displaces the dummies, and reversing a prefix or
a suffix of the path is just a 2-opt move that involves a dummy edge.
"""
from __future__ import annotations

import time
from collections import namedtuple
from typing import Optional

import numpy as np

__all__ = ["path_length", "held_karp_path", "solve_open_path", "HELD_KARP_MAX_N"]

HELD_KARP_MAX_N = 12
"""Largest n for the exact solver: its table has 2**n * n entries and each needs n candidates."""

_MAX_SEGMENT = 3
"""Longest segment that or-opt moves; longer moves are left to 2-opt and the perturbations."""

_KICK_SEGMENT = 50
"""Longest segment a perturbation moves. For small n that reshuffles the whole path (a restart
that keeps good pieces); for large n it stays local, so repairing it is cheap."""


def path_length(dist, order) -> float:
    """Total distance between consecutive entries of ``order``."""
    dist = np.asarray(dist, dtype=np.float64)
    order = np.asarray(order, dtype=np.intp)
    if order.size < 2:
        return 0.0
    return float(dist[order[:-1], order[1:]].sum())


def _check_distances(dist) -> np.ndarray:
    """Return ``dist`` as a clean float64 matrix, or say exactly why it is not a distance matrix.

    The diagonal is never used by a path, so it need not be zero. Small asymmetry (float32
    round-off from ``torch.cdist``) is averaged away; anything larger is an error, because the
    dummy-node formulation and the 2-opt gains assume d[i, j] == d[j, i].
    """
    d = np.array(dist, dtype=np.float64)  # a copy: the caller's array is never modified
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distance matrix must be square (n x n), got shape {d.shape}")
    if d.size == 0:
        return d
    if not np.isfinite(d).all():
        raise ValueError("distance matrix contains NaN or infinite entries")
    if d.min() < 0:
        raise ValueError(f"distance matrix has negative entries (min {d.min():g})")
    asym = float(np.abs(d - d.T).max())
    if asym > 1e-5 * float(d.max()):
        raise ValueError(f"distance matrix is not symmetric: max |D - D.T| = {asym:g} "
                         f"(largest distance {d.max():g})")
    return 0.5 * (d + d.T) if asym else d


# ----------------------------------------------------------------------------------------------
# Exact: Held-Karp
# ----------------------------------------------------------------------------------------------

def held_karp_path(dist) -> np.ndarray:
    """Exact shortest open path, by dynamic programming over subsets (O(2**n * n**2)).

    ``cost[S, j]`` is the length of the shortest path that visits exactly the set S and ends at
    j (it may start anywhere, which is what makes the path open). Subsets are processed layer by
    layer in order of size, each layer as one numpy operation: extending every path of a layer
    by every node at once.
    """
    d = _check_distances(dist)
    n = len(d)
    if n > HELD_KARP_MAX_N:
        raise ValueError(f"held_karp_path is exponential; n = {n} > {HELD_KARP_MAX_N}, "
                         "use solve_open_path")
    if n <= 2:
        return np.arange(n, dtype=np.intp)

    full = (1 << n) - 1
    bits = 1 << np.arange(n)
    cost = np.full((1 << n, n), np.inf)
    parent = np.full((1 << n, n), -1, dtype=np.intp)
    cost[bits, np.arange(n)] = 0.0  # a path of one node costs nothing

    subsets = np.arange(1 << n)
    size = np.array([bin(s).count("1") for s in range(1 << n)])
    for k in range(1, n):
        layer = subsets[size == k]
        # via[s, j, t]: path over layer[s] ending at j, then one step to t.
        via = cost[layer][:, :, None] + d[None, :, :]
        best_end = via.argmin(axis=1)                       # (subsets, t)
        best = np.take_along_axis(via, best_end[:, None, :], axis=1)[:, 0, :]
        rows, t = np.nonzero((layer[:, None] & bits[None, :]) == 0)  # t not yet visited
        grown = layer[rows] | bits[t]                       # each (grown, t) arises once
        cost[grown, t] = best[rows, t]
        parent[grown, t] = best_end[rows, t]

    end = int(cost[full].argmin())
    order = [end]
    visited = full
    while parent[visited, order[-1]] >= 0:
        prev = int(parent[visited, order[-1]])
        visited ^= 1 << order[-1]
        order.append(prev)
    return np.array(order[::-1], dtype=np.intp)


# ----------------------------------------------------------------------------------------------
# Heuristic: construction, 2-opt + or-opt local search, perturbation
# ----------------------------------------------------------------------------------------------

def _nearest_neighbour_path(d: np.ndarray, start: int) -> np.ndarray:
    """Greedy path: from ``start``, always step to the closest unvisited node."""
    n = len(d)
    visited = np.zeros(n)                     # 0, or inf once visited
    path = np.empty(n, dtype=np.intp)
    node = start
    for step in range(n):
        path[step] = node
        visited[node] = np.inf
        node = int((d[node] + visited).argmin())
    return path


def _neighbour_lists(d: np.ndarray, k: int):
    """The ``k`` nearest other nodes of every node, nearest first, and their distances.

    Local search only tries moves that create an edge to one of these: a move that only adds
    long edges rarely improves a path, and this keeps one round O(n k) instead of O(n**2).
    """
    far = d + np.diag(np.full(len(d), np.inf))   # a node is not its own neighbour
    nbr = np.argpartition(far, k - 1, axis=1)[:, :k]
    nbr_dist = np.take_along_axis(d, nbr, axis=1)
    by_distance = np.argsort(nbr_dist, axis=1, kind="stable")
    nbr = np.take_along_axis(nbr, by_distance, axis=1)
    return nbr, np.take_along_axis(nbr_dist, by_distance, axis=1)


_MoveKind = namedtuple("_MoveKind", "or_opt cut_a cut_b join_a join_b seg_start seg_end "
                                    "clash_from clash_to reverse")


def _move_kinds():
    """Every kind of move tried around an anchor node x and one of its listed neighbours c.

    With x at position a and c at position b, each kind is a row of offsets from a or b. Every
    kind creates the edge (x, c):

    * 2-opt with shift s = 0 or -1 removes edge[a+s] and edge[b+s] (the edges after x and c, or
      the edges before them) and adds (x, c) and (q[a+2s+1], q[b+2s+1]); it reverses the path
      between the two removed edges.
    * or-opt cuts out a segment q[i..k] of 1..3 nodes with x at one end and puts it back after
      position j = b (c just before x) or j = b - 1 (c just after x), reversed if that is what
      it takes to put x next to c. It removes edge[i-1], edge[k], edge[j] and adds
      (q[i-1], q[k+1]), (x, c) and (other end of the segment, q[j+1] or q[j]).

    So the gain of every kind is
        edge[a + cut_a] + edge[b + cut_b] - d(x, c) - d(q[a + join_a], q[b + join_b])
        + or_opt * (edge[a + seg_end] - d(q[a + seg_start - 1], q[a + seg_end + 1])),
    which lets all kinds be evaluated for all anchors and neighbours in one go. An or-opt move
    is valid when the segment lies inside the path and j is outside [i - 1, k], that is unless
    clash_from <= b - a <= clash_to; for 2-opt that range is empty, c != x is all it needs.
    """
    kinds = [_MoveKind(False, s, s, 2 * s + 1, 2 * s + 1, 0, 0, 1, 0, True) for s in (0, -1)]
    for length in range(1, _MAX_SEGMENT + 1):
        for x_first in ((True,) if length == 1 else (True, False)):
            seg_start = 0 if x_first else 1 - length
            seg_end = seg_start + length - 1
            for c_before in (True, False):
                cut_b = 0 if c_before else -1
                kinds.append(_MoveKind(True, seg_start - 1, cut_b,
                                       seg_end if x_first else seg_start, 1 if c_before else -1,
                                       seg_start, seg_end, seg_start - 1 - cut_b, seg_end - cut_b,
                                       x_first != c_before))
    return kinds


_MOVE_KINDS = _move_kinds()
_MOVES = _MoveKind(*(np.array(column, dtype=np.intp)[None, :, None]
                     for column in zip(*_MOVE_KINDS)))
"""The table as columns of shape (1, kinds, 1), to broadcast against (anchors, 1, neighbours)."""


def _decode(kind, a, b):
    """Move ``kind`` around anchor position a and neighbour position b, as (i, k, j, reverse):
    cut out segment q[i..k], reverse it or not, put it back right after position j. 2-opt is
    the case j = i - 1, reverse (reverse in place); or-opt has j outside [i - 1, k]."""
    m = _MOVE_KINDS[kind]
    if not m.or_opt:
        u, v = min(a, b) + m.cut_a, max(a, b) + m.cut_a   # the two edges it removes
        return u + 1, v, u, True
    return a + m.seg_start, a + m.seg_end, b + m.cut_b, m.reverse


def _best_moves(de, q, pos, anchors, nbr, nbr_dist):
    """The best move around each anchor node: its gain, its kind and the neighbour it joins.

    Positions that fall off the ends of q are clipped; they only occur in invalid moves, which
    are masked out.
    """
    n = len(q) - 2
    mv = _MOVES
    edge = de[q[:-1], q[1:]]                  # edge[t] = d(q[t], q[t+1]), t = 0..n
    a = pos[anchors][:, None, None]           # (anchors, 1, 1), positions in 1..n
    b = pos[nbr[anchors]][:, None, :]         # (anchors, 1, neighbours)

    def node_at(offset):                      # q[a + offset], (anchors, kinds, 1)
        return q.take(a + offset, mode="clip")

    # The terms that depend on the anchor only, -inf where the segment sticks out of the path.
    anchor_part = edge.take(a + mv.cut_a, mode="clip") + mv.or_opt * (
        edge.take(a + mv.seg_end, mode="clip")
        - de[node_at(mv.seg_start - 1), node_at(mv.seg_end + 1)])
    inside = (a + mv.seg_start >= 1) & (a + mv.seg_end <= n)
    anchor_part = np.where(inside, anchor_part, -np.inf)
    # The terms that depend on the neighbour as well: (anchors, kinds, neighbours).
    gain = (anchor_part - nbr_dist[anchors][:, None, :] + edge[b + mv.cut_b]
            - de.take(node_at(mv.join_a) * (n + 1) + q[b + mv.join_b]))
    overlap = (b - a >= mv.clash_from) & (b - a <= mv.clash_to)
    gain = np.where(overlap, -np.inf, gain).reshape(len(anchors), -1)

    best = gain.argmax(axis=1)
    kind, column = np.divmod(best, nbr.shape[1])
    return gain.max(axis=1), kind, nbr[anchors, column]


def _apply_move(q, i, k, j, reverse):
    """Move segment q[i..k] (reversed or not) to just after position j, in place."""
    segment = q[i:k + 1][::-1] if reverse else q[i:k + 1].copy()
    if j < i:
        q[j + 1:k + 1] = np.concatenate([segment, q[j + 1:i]])
    else:
        q[i:j + 1] = np.concatenate([q[k + 1:j + 1], segment])


def _local_search(de, q, nbr, nbr_dist, active, tol, deadline):
    """Apply improving 2-opt / or-opt moves to ``q`` (in place) until none is left.

    Each round evaluates the best move around every active node in one vectorised sweep, then
    applies, best first, every move whose stretch of edges does not overlap a move already
    taken: such moves change disjoint parts of the path and keep their ends in place, so their
    gains add up exactly and one sweep pays for many moves. A node with no improving move goes
    inactive (a "don't-look bit") until a move changes an edge next to it; when no node is
    active, a sweep over all nodes confirms the path is a local optimum.
    """
    n = len(q) - 2
    pos = np.empty(n + 1, dtype=np.intp)      # pos[node] = its index in q
    while deadline is None or time.perf_counter() < deadline:
        anchors = np.flatnonzero(active)
        full_sweep = len(anchors) == 0 or 4 * len(anchors) > n
        if full_sweep:  # the confirming sweep; or a partial one that would cost about as much
            active[:] = True
            anchors = np.arange(n)
        pos[q[1:-1]] = np.arange(1, n + 1)
        gain, kind, neighbour = _best_moves(de, q, pos, anchors, nbr, nbr_dist)
        improving = gain > tol
        active[anchors[~improving]] = False
        if not improving.any() and full_sweep:
            return
        taken = np.zeros(n + 1, dtype=bool)   # edges already changed this round
        touched = [q[:0]]
        for m in np.flatnonzero(improving)[np.argsort(-gain[improving], kind="stable")]:
            i, k, j, reverse = _decode(kind[m], pos[anchors[m]], pos[neighbour[m]])
            lo, hi = min(i - 1, j), max(k, j)
            if taken[lo:hi + 1].any():
                continue
            taken[lo:hi + 1] = True
            touched.append(q[[i - 1, i, k, k + 1, j, j + 1]])
            _apply_move(q, i, k, j, reverse)
        touched = np.concatenate(touched)
        active[touched[touched < n]] = True


def _perturb(q, rng, max_segment):
    """Double bridge: swap two adjacent segments, A B C D -> A C B D, and return the nodes at
    the new junctions. A change that 2-opt and or-opt cannot undo in one move, so local search
    from here can reach a different local optimum."""
    n = len(q) - 2
    first = int(rng.integers(1, min(max_segment, n - 1) + 1))
    second = int(rng.integers(1, min(max_segment, n - first) + 1))
    p1 = int(rng.integers(1, n + 2 - first - second))
    p2, p3 = p1 + first, p1 + first + second
    q[p1:p3] = np.concatenate([q[p2:p3], q[p1:p2]])
    junctions = q[[p1 - 1, p1, p1 + second - 1, p1 + second, p3 - 1, p3]]
    return junctions[junctions < n]


def solve_open_path(dist, seed: int = 0, max_rounds: int = 4,
                    time_limit: Optional[float] = None, neighbours: int = 10,
                    initial=None) -> np.ndarray:
    """Short open Hamiltonian path through ``dist``: a permutation of ``range(n)``.

    Nearest-neighbour paths from a few starts (or the order ``initial``, if given), the shortest
    polished by 2-opt and or-opt local search; then ``max_rounds`` times: perturb the best path
    (double bridge), polish again and keep the result if it is shorter. ``neighbours`` bounds
    which moves are tried (those creating an edge from a node to one of its nearest
    neighbours); for n <= neighbours + 1 every move is tried.

    Deterministic for a given ``seed``. With ``time_limit`` (seconds) the search stops early,
    which makes the result depend on the machine's speed; the path returned is always valid.
    The O(n**2) set-up (input checks, construction, neighbour lists) is not interrupted.
    """
    d = _check_distances(dist)
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, not {neighbours}")
    n = len(d)
    if initial is not None:
        path = np.asarray(initial, dtype=np.intp)
        if path.shape != (n,) or not np.array_equal(np.sort(path), np.arange(n)):
            raise ValueError(f"initial must be a permutation of range({n})")
    if n <= 2:
        return np.arange(n, dtype=np.intp) if initial is None else path.copy()
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    rng = np.random.default_rng(seed)

    if initial is None:
        # Starts: the most remote node (likely an end of a good path) and two random ones.
        starts = [int(d.sum(axis=1).argmax())] + [int(s) for s in rng.choice(n, 2)]
        paths = [_nearest_neighbour_path(d, s) for s in dict.fromkeys(starts)]
        path = min(paths, key=lambda p: path_length(d, p))

    de = np.zeros((n + 1, n + 1))             # node n is the dummy, at distance 0 from all
    de[:n, :n] = d
    nbr, nbr_dist = _neighbour_lists(d, min(neighbours, n - 1))
    tol = 1e-9 * float(d.max())               # gains below this are round-off, not progress

    q = np.concatenate([[n], path, [n]]).astype(np.intp)
    _local_search(de, q, nbr, nbr_dist, np.ones(n, dtype=bool), tol, deadline)
    best, best_length = q, path_length(de, q)
    for _ in range(max_rounds):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        q = best.copy()
        active = np.zeros(n, dtype=bool)
        active[_perturb(q, rng, _KICK_SEGMENT)] = True
        _local_search(de, q, nbr, nbr_dist, active, tol, deadline)
        length = path_length(de, q)
        if length < best_length - tol:
            best, best_length = q, length
    return best[1:-1].copy()
