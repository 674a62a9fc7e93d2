// CPU-side batching hot loops for r1mega: Karmarkar–Karp balanced partitioning of sequence
// lengths across data-parallel ranks, and packing into micro-batches under a token budget.
//
// This file is the compiled twin of r1mega/batching/balance.py. Both implement exactly the same
// algorithm with exactly the same tie-breaking, so they return IDENTICAL index lists; the
// specification (and the reason for every ordering rule below) lives in balance.py's docstring.
// Any change here must be mirrored there, and tests/test_batching.py checks the parity.
//
// Python-facing functions (lengths: 1-D int64 numpy array, already validated by the Python layer,
// validated again here; std::invalid_argument becomes ValueError):
//   partition(lengths, k, equal_size) -> list[list[int]]
//   pack(lengths, max_tokens, k, equal_size) -> list[list[list[int]]]
// The algorithms run with the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <queue>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = int64_t;
using Groups = std::vector<std::vector<i64>>;

// Number of consecutive micro-batch counts tried with Karmarkar–Karp before the best-fit
// fallback (must equal KK_ATTEMPTS in r1mega/batching/balance.py).
constexpr i64 kKKAttempts = 3;

// ---------------------------------------------------------------------------------------------
// Karmarkar–Karp k-way largest differencing.
//
// A partial solution ("state") is a list of at most k non-empty sets, kept sorted by
// (sum descending, smallest member index ascending); the missing sets are implicitly empty and
// come last. A set's members form a singly linked list through `nxt`, so joining two sets is O(1).
// ---------------------------------------------------------------------------------------------

struct Set {
  i64 sum;
  i64 min_idx;  // smallest member index: unique among disjoint non-empty sets -> total order
  i64 head;
  i64 tail;
};

inline bool set_before(const Set& a, const Set& b) {
  return a.sum != b.sum ? a.sum > b.sum : a.min_idx < b.min_idx;
}

// Priority of a state in the Karmarkar–Karp queue: largest spread first, ties to the smallest
// push counter `seq` (the state pushed first).
struct Key {
  i64 spread;
  i64 seq;
};

inline bool pops_first(const Key& x, const Key& y) {
  return x.spread != y.spread ? x.spread > y.spread : x.seq < y.seq;
}

struct HeapEntry {
  Key key;
  i64 slot;
};

// std::priority_queue pops the "largest" element, i.e. the one that pops first.
struct HeapLess {
  bool operator()(const HeapEntry& x, const HeapEntry& y) const { return pops_first(y.key, x.key); }
};

inline i64 spread_of(const std::vector<Set>& s, i64 k) {
  // Missing sets are empty (sum 0), so a state with fewer than k sets spreads to its largest sum.
  if (static_cast<i64>(s.size()) < k) return s.front().sum;
  return s.front().sum - s.back().sum;
}

// Merge the sorted run `src` (sorted by set_before) into the sorted vector `dst`, in place, from
// the back: each src element finds its place by binary search, and the dst block behind it moves
// with one memmove. O(m log a + moved elements); typically m is 1 and the place is near the end.
void merge_sorted_into(std::vector<Set>& dst, const Set* src, size_t m) {
  if (m == 0) return;
  const size_t a = dst.size();
  dst.resize(a + m);
  Set* d = dst.data();
  size_t hi = a;  // d[0, hi) holds the old elements not yet moved
  for (size_t j = m; j-- > 0;) {
    const size_t pos = static_cast<size_t>(std::upper_bound(d, d + hi, src[j], set_before) - d);
    if (hi > pos) std::memmove(d + pos + j + 1, d + pos, (hi - pos) * sizeof(Set));
    d[pos + j] = src[j];
    hi = pos;
  }
}

// A <- merge(A, B): set i of A (in padded order) joins set k-1-i of B, then re-sort.
void merge_states(std::vector<Set>& A, const std::vector<Set>& B, i64 k, std::vector<i64>& nxt,
                  std::vector<Set>& tmp) {
  const i64 a = static_cast<i64>(A.size()), b = static_cast<i64>(B.size());
  if (a + b <= k) {  // no set of A meets a non-empty set of B: plain union
    merge_sorted_into(A, B.data(), B.size());
    return;
  }
  const i64 cut = k - b;  // A[cut..a) meet B[k-1-i]; A[0..cut) and B[0..k-a) stay alone
  tmp.clear();
  for (i64 i = cut; i < a; ++i) {
    const Set& x = A[i];
    const Set& y = B[k - 1 - i];
    nxt[x.tail] = y.head;
    tmp.push_back(Set{x.sum + y.sum, std::min(x.min_idx, y.min_idx), x.head, y.tail});
  }
  for (i64 j = 0; j < k - a; ++j) tmp.push_back(B[j]);
  A.resize(cut);
  std::sort(tmp.begin(), tmp.end(), set_before);
  merge_sorted_into(A, tmp.data(), tmp.size());
}

// Indices ordered by (length, index), or by (length desc, index asc) when `descending`: a stable
// LSD radix sort (11-bit digits) of the identity permutation; only the digits that occur are
// sorted, so lengths below 2^22 take two passes.
std::vector<i64> order_by_length(const i64* L, i64 n, bool descending = false) {
  std::vector<i64> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
  std::iota(a.begin(), a.end(), i64{0});
  if (n < 2) return a;
  const i64 mx = *std::max_element(L, L + n);
  auto key = [&](i64 i) -> uint64_t { return static_cast<uint64_t>(descending ? mx - L[i] : L[i]); };
  constexpr int kBits = 11;
  constexpr uint64_t kMask = (uint64_t{1} << kBits) - 1;
  std::vector<i64> count(size_t{1} << kBits);
  for (int shift = 0; shift < 64 && (static_cast<uint64_t>(mx) >> shift) != 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (i64 t = 0; t < n; ++t) ++count[(key(a[t]) >> shift) & kMask];
    i64 pos = 0;
    for (auto& c : count) {
      const i64 here = c;
      c = pos;
      pos += here;
    }
    for (i64 t = 0; t < n; ++t) b[count[(key(a[t]) >> shift) & kMask]++] = a[t];
    a.swap(b);
  }
  return a;
}

struct KKResult {
  Groups groups;   // exactly k groups, each sorted ascending; order: sum desc, min index asc
  i64 max_sum = 0; // sum of groups[0]
};

// Implementation note: the initial states all have seq < n0 (their count) and every merged state
// gets seq >= n0, so the single priority queue of the specification is realised as two queues with
// the same pop order: the initial states sorted once by pop priority (consumed front to back),
// and a binary heap holding only merged states. An initial state wins a spread tie against a
// merged one (smaller seq).
KKResult karmarkar_karp(const i64* L, i64 n, i64 k, bool equal_size) {
  KKResult res;
  res.groups.resize(static_cast<size_t>(k));
  if (n == 0) return res;
  if (k == 1) {  // one group holds everything (the general loop agrees; this skips the work)
    res.groups[0].resize(static_cast<size_t>(n));
    std::iota(res.groups[0].begin(), res.groups[0].end(), i64{0});
    i64 s = 0;
    for (i64 i = 0; i < n; ++i) s += L[i];
    res.max_sum = s;
    return res;
  }
  const std::vector<i64> order = order_by_length(L, n);

  // Initial states in pop order. Singletons (equal_size=False): seq = rank in `order`, spread =
  // length (k > 1), so the pop order is (length desc, index asc). Chunks (equal_size=True): sorted
  // by (spread desc, seq asc) explicitly.
  std::vector<std::vector<Set>> chunks;
  std::vector<Key> init_keys;  // pop-ordered keys of the initial states
  std::vector<i64> init_ids;   // item index (singletons) or chunk id, in pop order
  if (equal_size) {
    const i64 n0 = n / k;
    chunks.resize(static_cast<size_t>(n0));
    std::vector<std::pair<Key, i64>> keyed;
    keyed.reserve(static_cast<size_t>(n0));
    for (i64 c = 0; c < n0; ++c) {
      std::vector<Set>& s = chunks[c];
      s.reserve(static_cast<size_t>(k));
      for (i64 t = c * k; t < (c + 1) * k; ++t) {
        const i64 i = order[t];
        s.push_back(Set{L[i], i, i, i});
      }
      std::sort(s.begin(), s.end(), set_before);
      keyed.push_back({Key{spread_of(s, k), c}, c});
    }
    std::sort(keyed.begin(), keyed.end(), [](const auto& x, const auto& y) { return pops_first(x.first, y.first); });
    for (const auto& e : keyed) {
      init_keys.push_back(e.first);
      init_ids.push_back(e.second);
    }
  } else {
    // Reverse `order` group by group of equal length: lengths descending, indices ascending.
    init_ids.reserve(static_cast<size_t>(n));
    init_keys.reserve(static_cast<size_t>(n));
    i64 hi = n;
    while (hi > 0) {
      i64 lo = hi - 1;
      while (lo > 0 && L[order[lo - 1]] == L[order[hi - 1]]) --lo;
      for (i64 t = lo; t < hi; ++t) {
        init_ids.push_back(order[t]);
        init_keys.push_back(Key{L[order[t]], t});
      }
      hi = lo;
    }
  }
  const i64 n0 = static_cast<i64>(init_ids.size());

  std::vector<i64> nxt(static_cast<size_t>(n), -1);
  std::vector<std::vector<Set>> pool;   // heap-resident merged states, by slot
  std::vector<i64> free_slots;
  std::vector<std::vector<Set>> spare;  // cleared vectors kept for their capacity
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, HeapLess> heap;
  // The most recently merged state waits outside the heap until the next merge: it is usually
  // popped straight back (a state with fewer than k sets keeps absorbing the next item), which
  // then costs no heap traffic. Having the largest seq, it only wins on a strictly larger spread.
  std::vector<Set> held;
  Key held_key{0, 0};
  bool has_held = false;
  i64 ptr = 0, seq = n0;

  auto take_slot = [&]() {
    if (!free_slots.empty()) {
      const i64 slot = free_slots.back();
      free_slots.pop_back();
      return slot;
    }
    pool.emplace_back();
    return static_cast<i64>(pool.size()) - 1;
  };
  auto pop = [&]() -> std::vector<Set> {
    int src = -1;  // 0: initial queue, 1: heap, 2: held
    const Key* best = nullptr;
    if (ptr < n0) {
      src = 0;
      best = &init_keys[ptr];
    }
    if (!heap.empty() && (best == nullptr || pops_first(heap.top().key, *best))) {
      src = 1;
      best = &heap.top().key;
    }
    if (has_held && (best == nullptr || pops_first(held_key, *best))) src = 2;
    if (src == 2) {
      has_held = false;
      return std::move(held);
    }
    if (src == 1) {
      const i64 slot = heap.top().slot;
      heap.pop();
      free_slots.push_back(slot);
      return std::move(pool[slot]);
    }
    const i64 id = init_ids[ptr++];
    if (equal_size) return std::move(chunks[id]);
    std::vector<Set> v;
    if (!spare.empty()) {
      v = std::move(spare.back());
      spare.pop_back();
    }
    v.push_back(Set{L[id], id, id, id});
    return v;
  };

  std::vector<Set> tmp;
  while ((n0 - ptr) + static_cast<i64>(heap.size()) + (has_held ? 1 : 0) > 1) {
    std::vector<Set> A = pop();
    std::vector<Set> B = pop();
    merge_states(A, B, k, nxt, tmp);
    B.clear();
    spare.push_back(std::move(B));
    if (has_held) {
      const i64 slot = take_slot();
      pool[slot] = std::move(held);
      heap.push(HeapEntry{held_key, slot});
    }
    held = std::move(A);
    held_key = Key{spread_of(held, k), seq++};
    has_held = true;
  }
  const std::vector<Set> fin = pop();
  // Label every item with its group, then one ascending pass fills the groups already sorted.
  // (`nxt` is reused for the labels: each link is read before it is overwritten.)
  std::vector<i64> count(fin.size(), 0);
  for (size_t g = 0; g < fin.size(); ++g) {
    for (i64 j = fin[g].head; j != -1;) {
      const i64 next = nxt[j];
      nxt[j] = static_cast<i64>(g);
      j = next;
      ++count[g];
    }
  }
  for (size_t g = 0; g < fin.size(); ++g) res.groups[g].reserve(static_cast<size_t>(count[g]));
  for (i64 i = 0; i < n; ++i) res.groups[nxt[i]].push_back(i);
  res.max_sum = fin.front().sum;
  return res;
}

// ---------------------------------------------------------------------------------------------
// Best-fit decreasing into bins of capacity `cap` (bins opened on demand). Items go in order of
// (length desc, index asc) to the bin with the least room that still fits, ties to the lower bin
// id. Returns the bins (member indices in placement order).
// ---------------------------------------------------------------------------------------------
Groups best_fit_decreasing(const i64* L, i64 n, i64 cap) {
  const std::vector<i64> order = order_by_length(L, n, /*descending=*/true);
  Groups bins;
  std::set<std::pair<i64, i64>> room;  // (remaining capacity, bin id)
  for (i64 i : order) {
    const i64 x = L[i];
    auto it = room.lower_bound({x, -1});
    i64 rem, bid;
    if (it == room.end()) {
      bid = static_cast<i64>(bins.size());
      bins.emplace_back();
      rem = cap;
    } else {
      rem = it->first;
      bid = it->second;
      room.erase(it);
    }
    bins[bid].push_back(i);
    room.insert({rem - x, bid});
  }
  return bins;
}

// Order bins like a KK result (sum desc, smallest index asc), sort members, pad to m bins.
Groups canonical_bins(Groups bins, const i64* L, i64 m) {
  struct Key {
    i64 sum, min_idx;
    size_t pos;
  };
  std::vector<Key> keys;
  for (size_t b = 0; b < bins.size(); ++b) {
    std::sort(bins[b].begin(), bins[b].end());
    i64 s = 0;
    for (i64 i : bins[b]) s += L[i];
    keys.push_back(Key{s, bins[b].front(), b});
  }
  std::sort(keys.begin(), keys.end(),
            [](const Key& x, const Key& y) { return x.sum != y.sum ? x.sum > y.sum : x.min_idx < y.min_idx; });
  Groups out(static_cast<size_t>(m));
  for (size_t t = 0; t < keys.size(); ++t) out[t] = std::move(bins[keys[t].pos]);
  return out;
}

i64 ceil_div(i64 a, i64 b) { return a / b + (a % b != 0); }

// Returns, per rank, exactly M micro-batches (global indices, each sorted ascending).
std::vector<Groups> pack_microbatches(const i64* L, i64 n, i64 cap, i64 k, bool equal_size) {
  const Groups ranks = karmarkar_karp(L, n, k, equal_size).groups;
  std::vector<std::vector<i64>> rank_lens(ranks.size());
  i64 m_lb = 0;
  for (size_t r = 0; r < ranks.size(); ++r) {
    if (ranks[r].empty()) continue;
    i64 s = 0, big = 0;
    for (i64 i : ranks[r]) {
      rank_lens[r].push_back(L[i]);
      s += L[i];
      big += (L[i] > cap / 2);  // two such sequences never share a micro-batch
    }
    m_lb = std::max({m_lb, ceil_div(s, cap), big, i64{1}});
  }
  std::vector<Groups> out(ranks.size());
  if (m_lb == 0) return out;  // no sequences at all: zero micro-batches everywhere

  auto to_global = [&](size_t r, Groups&& local) {
    for (auto& mb : local)
      for (auto& j : mb) j = ranks[r][j];
    out[r] = std::move(local);
  };

  for (i64 m = m_lb; m < m_lb + kKKAttempts; ++m) {
    bool ok = true;
    for (size_t r = 0; r < ranks.size() && ok; ++r) {
      KKResult kk = karmarkar_karp(rank_lens[r].data(), static_cast<i64>(rank_lens[r].size()), m, false);
      if (kk.max_sum > cap) {
        ok = false;
      } else {
        to_global(r, std::move(kk.groups));
      }
    }
    if (ok) return out;
  }

  // Fallback: best-fit decreasing always fits; M = max(m_lb, largest BFD bin count). Ranks where
  // KK into M micro-batches fits keep the balanced KK split, the others take their BFD bins.
  std::vector<Groups> bfd(ranks.size());
  i64 m = m_lb;
  for (size_t r = 0; r < ranks.size(); ++r) {
    bfd[r] = best_fit_decreasing(rank_lens[r].data(), static_cast<i64>(rank_lens[r].size()), cap);
    m = std::max(m, static_cast<i64>(bfd[r].size()));
  }
  for (size_t r = 0; r < ranks.size(); ++r) {
    const i64* lr = rank_lens[r].data();
    KKResult kk = karmarkar_karp(lr, static_cast<i64>(rank_lens[r].size()), m, false);
    if (kk.max_sum <= cap) {
      to_global(r, std::move(kk.groups));
    } else {
      to_global(r, canonical_bins(std::move(bfd[r]), lr, m));
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Validation (same checks, order and messages as balance.py) and Python conversion.
// ---------------------------------------------------------------------------------------------

using LengthArray = py::array_t<i64, py::array::c_style>;

void check_k(i64 k) {
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
}

void check_lengths(const i64* L, i64 n) {
  i64 total = 0;
  for (i64 i = 0; i < n; ++i) {
    if (L[i] < 0)
      throw std::invalid_argument("negative length at index " + std::to_string(i) + ": lengths[" +
                                  std::to_string(i) + "] = " + std::to_string(L[i]));
  }
  for (i64 i = 0; i < n; ++i) {
    if (__builtin_add_overflow(total, L[i], &total))
      throw std::invalid_argument("the sum of lengths does not fit in int64");
  }
}

void check_equal_size(i64 n, i64 k, bool equal_size) {
  if (equal_size && n % k != 0)
    throw std::invalid_argument("equal_size=True needs len(lengths) divisible by k, got " + std::to_string(n) +
                                " sequences for k=" + std::to_string(k));
}

py::list to_pylist(const std::vector<i64>& v) {
  py::list out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    PyObject* o = PyLong_FromLongLong(v[i]);
    if (!o) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), o);
  }
  return out;
}

py::list to_pylist(const Groups& g) {
  py::list out(g.size());
  for (size_t i = 0; i < g.size(); ++i) PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), to_pylist(g[i]).release().ptr());
  return out;
}

const i64* lengths_ptr(const LengthArray& lengths, i64* n) {
  if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be 1-D, got " + std::to_string(lengths.ndim()) + "-D");
  *n = static_cast<i64>(lengths.shape(0));
  return lengths.data();
}

py::list py_partition(const LengthArray& lengths, i64 k, bool equal_size) {
  i64 n;
  const i64* p = lengths_ptr(lengths, &n);
  check_k(k);
  check_lengths(p, n);
  check_equal_size(n, k, equal_size);
  std::vector<i64> L(p, p + n);
  Groups groups;
  {
    py::gil_scoped_release release;
    groups = karmarkar_karp(L.data(), n, k, equal_size).groups;
  }
  return to_pylist(groups);
}

py::list py_pack(const LengthArray& lengths, i64 max_tokens, i64 k, bool equal_size) {
  i64 n;
  const i64* p = lengths_ptr(lengths, &n);
  check_k(k);
  if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(max_tokens));
  check_lengths(p, n);
  for (i64 i = 0; i < n; ++i) {
    if (p[i] > max_tokens)
      throw std::invalid_argument("sequence at index " + std::to_string(i) + " has length " + std::to_string(p[i]) +
                                  " > max_tokens=" + std::to_string(max_tokens));
  }
  check_equal_size(n, k, equal_size);
  std::vector<i64> L(p, p + n);
  std::vector<Groups> packed;
  {
    py::gil_scoped_release release;
    packed = pack_microbatches(L.data(), n, max_tokens, k, equal_size);
  }
  py::list out(packed.size());
  for (size_t r = 0; r < packed.size(); ++r)
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(r), to_pylist(packed[r]).release().ptr());
  return out;
}

}  // namespace

PYBIND11_MODULE(_batching, m) {
  m.doc() = "C++ hot loops for r1mega.batching (use the r1mega.batching API, not this module).";
  m.def("partition", &py_partition, py::arg("lengths"), py::arg("k"), py::arg("equal_size") = false,
        "Karmarkar-Karp partition of int64 `lengths` into k index lists (see r1mega.batching.partition_balanced).");
  m.def("pack", &py_pack, py::arg("lengths"), py::arg("max_tokens"), py::arg("k"), py::arg("equal_size") = false,
        "Balance across k ranks, then pack each rank into the same number of micro-batches "
        "(see r1mega.batching.pack_microbatches).");
  m.attr("KK_ATTEMPTS") = kKKAttempts;
}
