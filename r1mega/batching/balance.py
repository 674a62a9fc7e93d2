"""Sequence-length balancing across data-parallel ranks and micro-batch packing.

Two public operations, each with a C++ implementation (``r1mega._batching``, built from
``csrc/batching.cpp``) and a pure-Python twin in this file. The two return IDENTICAL index lists
for every input, not merely equally good ones; ``tests/test_batching.py`` checks it.

``partition_balanced(lengths, k)``
    Karmarkar–Karp k-way largest differencing (LDM). Returns exactly ``k`` groups of indices.

``pack_microbatches(lengths, max_tokens, k)``
    ``partition_balanced`` across ``k`` ranks, then every rank is split into the SAME number ``M``
    of micro-batches whose summed length is ``<= max_tokens``.

Algorithm and tie-breaking (the contract both backends implement)
-----------------------------------------------------------------
Items are ordered by ``(length, index)`` ascending.

A *state* (partial solution) holds at most ``k`` non-empty sets, sorted by
``(sum descending, smallest member index ascending)``; conceptually it is padded to ``k`` sets with
empty ones, which come last. Smallest member indices are unique among disjoint non-empty sets, so
this order is total. The *spread* of a state is ``largest sum - smallest sum`` over the ``k``
padded sets (so a state with fewer than ``k`` non-empty sets spreads to its largest sum, and
with ``k == 1`` every spread is 0).

Initial states, pushed in item order with a push counter ``seq = 0, 1, 2, ...``:

* ``equal_size=False``: one state per item, holding that item alone;
* ``equal_size=True``: one state per consecutive chunk of ``k`` items, one item per set (so every
  set gains exactly one item per chunk and all groups end with ``n / k`` items).

The heap pops the state with the largest spread, ties to the smallest ``seq`` (pushed first).
While more than one state is left: pop ``A``, pop ``B``, merge set ``i`` of ``A`` with set
``k - 1 - i`` of ``B`` (padded order: A's largest meets B's smallest), re-sort the sets by the
order above and push the result with the next ``seq``. The last state's sets are the groups, in
that order (sum descending, then smallest index; empty groups last); each group's indices are
sorted ascending. ``k > len(lengths)`` is allowed and yields empty groups.

Micro-batches (``pack_microbatches``)
-------------------------------------
Let ``ranks = partition_balanced(lengths, k, equal_size=equal_size)`` and ``B = max_tokens``.
``M_lb`` = the maximum over non-empty ranks of ``max(ceil(rank_sum / B), #{len > B // 2}, 1)``
(a lower bound: no two sequences longer than ``B // 2`` share a micro-batch); ``M_lb = 0`` only
when there are no sequences at all, and then every rank gets zero micro-batches.

1. For ``M = M_lb, M_lb + 1, ..., M_lb + KK_ATTEMPTS - 1``: split every rank into ``M`` groups with
   Karmarkar–Karp (``equal_size=False``). The first ``M`` where every rank's largest group fits
   ``B`` wins.
2. Otherwise (rare: needs sequences close to ``B``), pack each rank with best-fit decreasing (BFD;
   items by ``(length desc, index asc)``, each into the open bin with the least room that fits,
   ties to the lower bin id, a new bin when none fits) and let ``M = max(M_lb, largest BFD bin
   count)``. Each rank takes its Karmarkar–Karp split into ``M`` groups when that fits ``B``, else
   its BFD bins (ordered like KK groups).

Every rank therefore gets exactly ``M`` micro-batches (lockstep data-parallel / pipeline
schedules need equal counts), each with summed length ``<= max_tokens``; micro-batches are ordered
by summed length descending (then smallest index), and a micro-batch can be EMPTY when a rank has
fewer sequences (or less work) than ``M`` requires (e.g. ``k > len(lengths)``). Indices are
positions in ``lengths``, sorted ascending within a micro-batch.

Inputs and errors
-----------------
``lengths``: a sequence of ints, a 1-D numpy integer array or a 1-D torch integer tensor. Floats and
bools are rejected (``TypeError``). ``ValueError`` for: ``k < 1``, ``max_tokens < 1``, a negative
length (the message names the index), a sequence longer than ``max_tokens`` (names the index and
length), ``equal_size=True`` with ``len(lengths) % k != 0``, and a total that does not fit int64.
The Python layer validates before dispatch; the C++ module re-validates with the same messages.
"""

from __future__ import annotations

import heapq
import operator
from bisect import bisect_left, insort
from typing import Sequence

import numpy as np

try:  # the compiled twin; absent in a source tree that was never built
    from r1mega import _batching as _cpp

    if not hasattr(_cpp, "partition"):  # an old placeholder build
        raise ImportError("r1mega._batching is a placeholder build without the batching functions")
    _CPP_ERROR: ImportError | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _cpp = None
    _CPP_ERROR = exc

__all__ = [
    "partition_balanced",
    "pack_microbatches",
    "imbalance",
    "lower_bound",
    "available_backends",
    "default_backend",
    "KK_ATTEMPTS",
]

#: Karmarkar–Karp micro-batch counts tried before the best-fit fallback (same constant in C++).
KK_ATTEMPTS = 3

_INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------
# Backends and validation
# ---------------------------------------------------------------------------------------------


def available_backends() -> list[str]:
    """The backends that can run here: ``["cpp", "python"]`` or ``["python"]``."""
    return ["cpp", "python"] if _cpp is not None else ["python"]


def default_backend() -> str:
    """What ``backend=None`` picks: ``"cpp"`` when the compiled module imports, else ``"python"``."""
    return "cpp" if _cpp is not None else "python"


def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        return default_backend()
    if backend == "cpp":
        if _cpp is None:
            raise ImportError(
                "backend='cpp' requested but the C++ extension r1mega._batching is unavailable "
                f"({_CPP_ERROR}); build it with `pip install -e .` or use backend='python'"
            )
        return backend
    if backend == "python":
        return backend
    raise ValueError(f"backend must be None, 'cpp' or 'python', got {backend!r}")


def _as_lengths(lengths) -> np.ndarray:
    """`lengths` as a contiguous 1-D int64 array; TypeError/ValueError on anything else."""
    if type(lengths).__module__.startswith("torch"):  # a torch tensor, without importing torch
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == object:  # Python ints beyond int64 (or junk)
        for i, v in enumerate(arr.tolist()):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"lengths must be integers, got {type(v).__name__} at index {i}")
            if v < 0:
                raise ValueError(f"negative length at index {i}: lengths[{i}] = {v}")
            if v > _INT64_MAX:
                raise ValueError(f"length at index {i} does not fit in int64: lengths[{i}] = {v}")
        raise TypeError("lengths must be integers")  # pragma: no cover - unreachable
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
        big = np.flatnonzero(arr > _INT64_MAX)
        if big.size:
            i = int(big[0])
            raise ValueError(f"length at index {i} does not fit in int64: lengths[{i}] = {int(arr[i])}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_k(k) -> int:
    if isinstance(k, bool):
        raise TypeError("k must be an integer, got bool")
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _check_lengths(arr: np.ndarray) -> None:
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        i = int(neg[0])
        raise ValueError(f"negative length at index {i}: lengths[{i}] = {int(arr[i])}")
    # Cheap bound first; the exact (Python int) sum only when the bound does not settle it.
    if arr.size and int(arr.max()) * arr.size > _INT64_MAX and sum(arr.tolist()) > _INT64_MAX:
        raise ValueError("the sum of lengths does not fit in int64")


def _check_equal_size(n: int, k: int, equal_size: bool) -> None:
    if equal_size and n % k != 0:
        raise ValueError(f"equal_size=True needs len(lengths) divisible by k, got {n} sequences for k={k}")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def partition_balanced(
    lengths: Sequence[int] | np.ndarray,
    k: int,
    *,
    equal_size: bool = False,
    backend: str | None = None,
) -> list[list[int]]:
    """Split sequence indices into ``k`` groups with near-equal summed length (Karmarkar–Karp).

    Returns exactly ``k`` lists of indices into ``lengths``: each sorted ascending, groups ordered
    by summed length descending then smallest index, empty groups (``k > len(lengths)``) last.
    ``equal_size=True`` gives every group exactly ``len(lengths) // k`` indices (requires
    divisibility). Both backends return identical lists; see the module docstring for the exact
    algorithm and tie-breaking.
    """
    k = _check_k(k)
    arr = _as_lengths(lengths)
    _check_lengths(arr)
    _check_equal_size(arr.size, k, bool(equal_size))
    if _resolve_backend(backend) == "cpp":
        return _cpp.partition(arr, k, bool(equal_size))
    return _py_partition(arr.tolist(), k, bool(equal_size))


def pack_microbatches(
    lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    k: int,
    *,
    equal_size: bool = False,
    backend: str | None = None,
) -> list[list[list[int]]]:
    """Balance sequences across ``k`` ranks, then pack each rank into micro-batches.

    Returns ``out[rank][micro_batch] -> sorted index list``. Every rank gets the same number of
    micro-batches (possibly including empty ones), each with summed length ``<= max_tokens``; the
    ranks are ``partition_balanced(lengths, k, equal_size=equal_size)``. A sequence longer than
    ``max_tokens`` raises ``ValueError`` naming its index. See the module docstring for how the
    micro-batch count is chosen.
    """
    k = _check_k(k)
    if isinstance(max_tokens, bool):
        raise TypeError("max_tokens must be an integer, got bool")
    max_tokens = operator.index(max_tokens)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    arr = _as_lengths(lengths)
    _check_lengths(arr)
    too_long = np.flatnonzero(arr > max_tokens)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"sequence at index {i} has length {int(arr[i])} > max_tokens={max_tokens}")
    _check_equal_size(arr.size, k, bool(equal_size))
    # Lengths and their total fit in int64, so a larger budget behaves exactly like INT64_MAX.
    max_tokens = min(max_tokens, _INT64_MAX)
    if _resolve_backend(backend) == "cpp":
        return _cpp.pack(arr, max_tokens, k, bool(equal_size))
    return _py_pack(arr.tolist(), max_tokens, k, bool(equal_size))


def lower_bound(lengths, k: int) -> float:
    """``max(total / k, longest)``: no k-way split can have a largest group sum below this."""
    k = _check_k(k)
    arr = _as_lengths(lengths)
    if arr.size == 0:
        return 0.0
    return max(sum(arr.tolist()) / k, float(arr.max()))


def imbalance(lengths, groups: Sequence[Sequence[int]]) -> float:
    """Largest group sum divided by ``lower_bound(lengths, len(groups))``; ``>= 1``, 1 is optimal.

    ``groups`` are index lists into ``lengths`` (e.g. ``partition_balanced``'s result; for
    ``pack_microbatches`` pass the flattened ranks ``[sum(mbs, []) for mbs in packed]``).
    Returns 1.0 when the bound is 0 (no tokens at all).
    """
    vals = _as_lengths(lengths).tolist()
    bound = lower_bound(lengths, len(groups))
    if bound == 0:
        return 1.0
    return max(sum(vals[i] for i in g) for g in groups) / bound


# ---------------------------------------------------------------------------------------------
# Pure-Python twin (mirror of csrc/batching.cpp; keep the two in step)
# ---------------------------------------------------------------------------------------------
# A set is the tuple (-sum, min_idx, head, tail): tuple order is exactly (sum desc, min_idx asc),
# and min_idx is unique, so head/tail never take part in a comparison. Members are a linked list
# through `nxt` (joining two sets is O(1)).


def _kk(L: list[int], k: int, equal_size: bool) -> tuple[list[list[int]], int]:
    """Karmarkar–Karp: (k groups, largest group sum). Inputs already validated.

    As in the C++ twin, the specification's single priority queue is run as two queues with the
    same pop order: the initial states (seq < n0) sorted once by (spread desc, seq asc), and a heap
    of merged states (seq >= n0), which lose spread ties against initial ones.
    """
    n = len(L)
    if n == 0:
        return [[] for _ in range(k)], 0
    if k == 1:  # one group holds everything (the general loop agrees; this skips the work)
        return [list(range(n))], sum(L)
    order = sorted(range(n), key=L.__getitem__)  # stable: (length, index)
    if equal_size:
        init = []  # entries (-spread, seq, sets)
        for seq, off in enumerate(range(0, n, k)):
            sets = sorted([(-L[i], i, i, i) for i in order[off : off + k]])
            init.append((sets[0][0] - sets[-1][0], seq, sets))
        init.sort(key=lambda e: (e[0], e[1]))
    else:
        # Singletons: spread = length, seq = rank in `order`; a stable reverse sort gives
        # (length desc, index asc) = (spread desc, seq asc).
        init = [(-L[i], 0, [(-L[i], i, i, i)]) for i in sorted(order, key=L.__getitem__, reverse=True)]
    n0 = len(init)
    ptr = 0
    seq = n0
    nxt = [-1] * n
    heap: list = []
    heappop, heappush = heapq.heappop, heapq.heappush

    while (n0 - ptr) + len(heap) > 1:
        if ptr < n0 and (not heap or init[ptr][0] <= heap[0][0]):
            A = init[ptr][2]
            ptr += 1
        else:
            A = heappop(heap)[2]
        if ptr < n0 and (not heap or init[ptr][0] <= heap[0][0]):
            B = init[ptr][2]
            ptr += 1
        else:
            B = heappop(heap)[2]
        a, b = len(A), len(B)
        if a + b <= k:  # no set of A meets a non-empty set of B: plain union
            if b == 1:
                insort(A, B[0])
            else:
                A += B
                A.sort()
        else:
            cut = k - b  # A[cut:] meet B[k-1-i]; A[:cut] and B[:k-a] stay alone
            comb = []
            for i in range(cut, a):
                x = A[i]
                y = B[k - 1 - i]
                nxt[x[3]] = y[2]
                comb.append((x[0] + y[0], x[1] if x[1] < y[1] else y[1], x[2], y[3]))
            if k > a:
                comb += B[: k - a]
            del A[cut:]
            if len(comb) <= 8:
                for s in comb:
                    insort(A, s)
            else:
                A += comb
                A.sort()
        heappush(heap, (A[0][0] - A[-1][0] if len(A) == k else A[0][0], seq, A))
        seq += 1
    final = init[ptr][2] if ptr < n0 else heap[0][2]
    groups = []
    for s in final:
        g = []
        j = s[2]
        while j != -1:
            g.append(j)
            j = nxt[j]
        g.sort()
        groups.append(g)
    groups.extend([] for _ in range(k - len(final)))
    return groups, -final[0][0]


def _py_partition(L: list[int], k: int, equal_size: bool) -> list[list[int]]:
    return _kk(L, k, equal_size)[0]


def _bfd(L: list[int], cap: int) -> list[list[int]]:
    """Best-fit decreasing, bins opened on demand; members in placement order."""
    order = sorted(range(len(L)), key=lambda i: (-L[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        x = L[i]
        p = bisect_left(room, (x, -1))
        if p == len(room):
            bid, rem = len(bins), cap
            bins.append([])
        else:
            rem, bid = room.pop(p)
        bins[bid].append(i)
        insort(room, (rem - x, bid))
    return bins


def _canonical_bins(bins: list[list[int]], L: list[int], m: int) -> list[list[int]]:
    keyed = []
    for b in bins:
        b = sorted(b)
        keyed.append((-sum(L[i] for i in b), b[0], b))
    keyed.sort(key=lambda t: (t[0], t[1]))
    out = [t[2] for t in keyed]
    out.extend([] for _ in range(m - len(out)))
    return out


def _py_pack(L: list[int], cap: int, k: int, equal_size: bool) -> list[list[list[int]]]:
    ranks = _kk(L, k, equal_size)[0]
    rank_lens = [[L[i] for i in r] for r in ranks]
    half = cap // 2
    m_lb = 0
    for lens in rank_lens:
        if lens:
            big = sum(1 for x in lens if x > half)  # two such sequences never share a micro-batch
            m_lb = max(m_lb, -(-sum(lens) // cap), big, 1)
    if m_lb == 0:  # no sequences at all: zero micro-batches everywhere
        return [[] for _ in ranks]

    def to_global(r: list[int], groups: list[list[int]]) -> list[list[int]]:
        return [[r[j] for j in g] for g in groups]

    for m in range(m_lb, m_lb + KK_ATTEMPTS):
        out = []
        for r, lens in zip(ranks, rank_lens):
            groups, top = _kk(lens, m, False)
            if top > cap:
                break
            out.append(to_global(r, groups))
        else:
            return out

    bfd = [_bfd(lens, cap) for lens in rank_lens]
    m = max([m_lb] + [len(b) for b in bfd])
    out = []
    for r, lens, bins in zip(ranks, rank_lens, bfd):
        groups, top = _kk(lens, m, False)
        if top > cap:
            groups = _canonical_bins(bins, lens, m)
        out.append(to_global(r, groups))
    return out
