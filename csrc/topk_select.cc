// Exact top-k along the last axis for XLA:CPU, registered with JAX through the XLA FFI.
//
// Contract of lax.top_k on CPU: values in descending order under the IEEE total order
// (-NaN < -inf < ... < -0 < +0 < ... < inf < +NaN, NaNs ordered by payload), int32 indices,
// ties broken by the lower index first.
//
// Per row of n entries, every float maps to an int32 key whose signed order is that total order.
//  1. Maxima of w strided blocks (block b holds entries b, b + w, b + 2w, ...): element-wise max
//     and min of the raw bits over the row's stripes of width w, no horizontal reductions and no
//     per-entry key conversion (a block's largest key is its largest raw bits if any is
//     non-negative, else its smallest). Strided blocks also spread out clustered high scores
//     (local or causal attention) better than contiguous ones.
//  2. A value t that k block maxima reach bounds the k-th largest key from below (k distinct
//     entries reach it); bisection on the key range takes t near the k-th largest maximum.
//  3. One pass keeps the entries at or above t (about k of them), compacted with a permutation
//     table; raw bits are compared when t is non-negative. It also prefetches the next row.
//  4. Each candidate's rank is the number of candidates above it under (key desc, index asc),
//     counted in a branch-free all-pairs pass; ranks below k place the output directly. Many
//     ties at t (masked keys) are resolved by a pass for the entries above t, the first ties
//     following them; other large candidate sets go to nth_element and a sort.
// Steps 1, 3 and 4 have AVX2 versions chosen at run time; the library is built for x86-64-v2 (or
// the host's own ISA elsewhere), so it loads on any machine. Rows are shared out over XLA's
// intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define TOPK_AVX2 __attribute__((target("avx2,popcnt")))
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Signed key whose order is the IEEE total order of the float with these bits.
inline int32_t TotalOrderKey(uint32_t bits) {
  int32_t s = static_cast<int32_t>(bits);
  return s ^ static_cast<int32_t>(static_cast<uint32_t>(s >> 31) >> 1);
}

// Scores as stored (T) and their raw bits as int32, the float's sign bit in the int's sign bit,
// so the signed order of the raw bits is the total order among non-negative floats, reversed
// among negative ones.
struct F32 {
  using T = uint32_t;
  static T Canonical(T v) { return v; }
  static int32_t Raw(T v) { return static_cast<int32_t>(v); }
  static int32_t KeyOfRaw(int32_t raw) { return TotalOrderKey(static_cast<uint32_t>(raw)); }
  static int32_t Key(T v) { return KeyOfRaw(Raw(v)); }
  // Largest raw bits whose order as keys matches their signed order: all non-negative ones.
  static constexpr int32_t kRawExactUpTo = INT32_MAX;
};

// XLA compares bfloat16 after converting to float32, which turns every NaN into the quiet NaN of
// its sign, so such NaNs tie (and come back canonical); matched here.
struct BF16 {
  using T = uint16_t;
  static T Canonical(T v) {
    return (v & 0x7FFF) > 0x7F80 ? static_cast<T>((v & 0x8000) | 0x7FC0) : v;
  }
  static int32_t Raw(T v) { return static_cast<int32_t>(static_cast<uint32_t>(v) << 16); }
  static int32_t KeyOfRaw(int32_t raw) {
    return TotalOrderKey(static_cast<uint32_t>(Canonical(static_cast<T>(raw >> 16))) << 16);
  }
  static int32_t Key(T v) { return KeyOfRaw(Raw(v)); }
  // NaNs share one key whatever their raw bits: exact up to +inf.
  static constexpr int32_t kRawExactUpTo = 0x7F800000;
};

// Candidate packed so that a larger int64 means a larger key, or an equal key at a lower index.
inline int64_t Pack(int32_t key, int32_t index) {
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<int64_t>(key)) << 32 |
                              (0xFFFFFFFFu - static_cast<uint32_t>(index)));
}

inline int32_t Unpack(int64_t packed) {
  return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(packed & 0xFFFFFFFF));
}

// Per-worker buffers, sized for rows of n entries.
struct Scratch {
  explicit Scratch(int64_t n)
      : high(n + 8), low(n + 8), keys(n + 16), kept(n + 16), packed(n) {}
  std::vector<int32_t> high, low;  // per strided block: largest and smallest raw bits, then keys
  std::vector<int32_t> keys;       // of the candidates, in index order, padded to a multiple of 8
  std::vector<int32_t> kept;       // indices of the candidates
  std::vector<int64_t> packed;     // candidates as Pack(key, index), for the sorting fallback
};

// The portable steps, also the tails of the vector ones.
struct Portable {
  template <typename F>
  static void Within(const F& f) {
    f();
  }

  // high[b], low[b] = max, min of (high[b], low[b], raw(stripe[b])) for b in [begin, end).
  template <typename D>
  static void ExtremaInto(const typename D::T* stripe, int64_t begin, int64_t end, int32_t* high,
                          int32_t* low) {
    for (int64_t b = begin; b < end; ++b) {
      high[b] = std::max(high[b], D::Raw(stripe[b]));
      low[b] = std::min(low[b], D::Raw(stripe[b]));
    }
  }

  // high[b], low[b] = max, min of the raw bits of x[b + s * w] over s < stripes, for b < w.
  template <typename D>
  static void Extrema(const typename D::T* x, int64_t stripes, int64_t w, int32_t* high,
                      int32_t* low) {
    std::fill(high, high + w, INT32_MIN);
    std::fill(low, low + w, INT32_MAX);
    for (int64_t s = 0; s < stripes; ++s) ExtremaInto<D>(x + s * w, 0, w, high, low);
  }

  // Number of maxima[0, w) at least t.
  static int64_t CountAtLeast(const int32_t* maxima, int64_t w, int32_t t) {
    int64_t count = 0;
    for (int64_t b = 0; b < w; ++b) count += maxima[b] >= t;
    return count;
  }

  // Appends the keys and indices in [begin, end) with key >= t, in order; returns how many.
  // With kRaw, t must be in [0, D::kRawExactUpTo] and raw bits are compared instead of keys.
  template <typename D, bool kRaw>
  static int64_t Compact(const typename D::T* x, int64_t begin, int64_t end, int32_t t,
                         int32_t* keys, int32_t* kept) {
    int64_t count = 0;
    for (int64_t i = begin; i < end; ++i) {
      if ((kRaw ? D::Raw(x[i]) : D::Key(x[i])) < t) continue;
      keys[count] = D::Key(x[i]);
      kept[count++] = static_cast<int32_t>(i);
    }
    return count;
  }

  // Rank of candidate i among keys[0, m) under (key desc, index asc); keys past m are INT32_MIN
  // up to m8, the next multiple of 8.
  static int64_t Rank(const int32_t* keys, int64_t m8, int64_t i) {
    int64_t rank = 0;
    for (int64_t j = 0; j < i; ++j) rank += keys[j] >= keys[i];
    for (int64_t j = i + 1; j < m8; ++j) rank += keys[j] > keys[i];
    return rank;
  }
};

#if defined(__x86_64__)
// Lanes of the 8-bit mask's set bits, in order, as bytes (the rest 0): a permutation that moves
// the selected 32-bit lanes to the front.
struct LeftPack {
  LeftPack() {
    for (int mask = 0; mask < 256; ++mask) {
      uint64_t lanes = 0;
      for (int lane = 0, out = 0; lane < 8; ++lane) {
        if (mask >> lane & 1) lanes |= static_cast<uint64_t>(lane) << (8 * out++);
      }
      table[mask] = lanes;
    }
  }
  uint64_t table[256];
};
const LeftPack kLeftPack;

TOPK_AVX2 inline __m256i Raw8(const F32::T* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

TOPK_AVX2 inline __m256i Raw8(const BF16::T* p) {
  return _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
}

TOPK_AVX2 inline __m256i TotalOrderKeys(__m256i bits) {
  return _mm256_xor_si256(bits, _mm256_srli_epi32(_mm256_srai_epi32(bits, 31), 1));
}

TOPK_AVX2 inline __m256i Keys8(const F32::T* p) { return TotalOrderKeys(Raw8(p)); }

TOPK_AVX2 inline __m256i Keys8(const BF16::T* p) {
  const __m256i bits = Raw8(p);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(INT32_MIN));
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_andnot_si256(sign, bits), _mm256_set1_epi32(0x7F800000));
  const __m256i quiet = _mm256_or_si256(sign, _mm256_set1_epi32(0x7FC00000));
  return TotalOrderKeys(_mm256_blendv_epi8(bits, quiet, nan));
}

TOPK_AVX2 inline int64_t Sum(__m256i x) {  // of the eight int32 lanes
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
}

struct Avx2 {
  // Runs f compiled for AVX2: everything it calls is inlined into this function.
  template <typename F>
  TOPK_AVX2 __attribute__((flatten)) static void Within(const F& f) {
    f();
  }

  template <typename D>
  TOPK_AVX2 static void ExtremaInto(const typename D::T* stripe, int64_t begin, int64_t end,
                                    int32_t* high, int32_t* low) {
    int64_t b = begin;
    for (; b + 8 <= end; b += 8) {
      const __m256i raw = Raw8(stripe + b);
      __m256i* h = reinterpret_cast<__m256i*>(high + b);
      __m256i* l = reinterpret_cast<__m256i*>(low + b);
      _mm256_storeu_si256(h, _mm256_max_epi32(_mm256_loadu_si256(h), raw));
      _mm256_storeu_si256(l, _mm256_min_epi32(_mm256_loadu_si256(l), raw));
    }
    Portable::ExtremaInto<D>(stripe, b, end, high, low);
  }

  // high[b], low[b] = max, min of the raw bits of x[b + s * w] over s < stripes, for b < w.
  template <typename D>
  TOPK_AVX2 static void Extrema(const typename D::T* x, int64_t stripes, int64_t w,
                                int32_t* high, int32_t* low) {
    // Four vectors of columns at a time, kept in registers down all the stripes.
    int64_t b = 0;
    for (; b + 32 <= w; b += 32) {
      __m256i h[4], l[4];
      for (int v = 0; v < 4; ++v) h[v] = l[v] = Raw8(x + b + 8 * v);
      for (int64_t s = 1; s < stripes; ++s) {
        for (int v = 0; v < 4; ++v) {
          const __m256i raw = Raw8(x + s * w + b + 8 * v);
          h[v] = _mm256_max_epi32(h[v], raw);
          l[v] = _mm256_min_epi32(l[v], raw);
        }
      }
      for (int v = 0; v < 4; ++v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(high + b + 8 * v), h[v]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + b + 8 * v), l[v]);
      }
    }
    std::fill(high + b, high + w, INT32_MIN);
    std::fill(low + b, low + w, INT32_MAX);
    for (int64_t s = 0; s < stripes; ++s) ExtremaInto<D>(x + s * w, b, w, high, low);
  }

  TOPK_AVX2 static int64_t CountAtLeast(const int32_t* maxima, int64_t w, int32_t t) {
    const __m256i bound = _mm256_set1_epi32(t);
    __m256i below = _mm256_setzero_si256();  // minus the count below t, per lane
    int64_t b = 0;
    for (; b + 8 <= w; b += 8) {
      const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(maxima + b));
      below = _mm256_add_epi32(below, _mm256_cmpgt_epi32(bound, m));
    }
    return b + Sum(below) + Portable::CountAtLeast(maxima + b, w - b, t);
  }

  template <typename D, bool kRaw>
  TOPK_AVX2 static int64_t Compact(const typename D::T* x, int64_t begin, int64_t end, int32_t t,
                                   int32_t* keys, int32_t* kept) {
    // Few entries pass: a branch skips the vectors where none does; those where some do pack
    // them to the front and store all eight lanes.
    const __m256i bound = _mm256_set1_epi32(t);
    int64_t count = 0;
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      // The next row is likely this worker's next: fetch it while this one is in cache.
      // (Integer arithmetic: past the last row, the address need not be in the buffer.)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x + i) +
                                                 end * sizeof(typename D::T)),
                   _MM_HINT_T0);
      const __m256i key = kRaw ? Raw8(x + i) : Keys8(x + i);
      const int pass =
          ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bound, key))) & 0xFF;
      if (pass == 0) continue;
      const __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(kLeftPack.table[pass]));
      const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(i)),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + count),
                          _mm256_permutevar8x32_epi32(kRaw ? Keys8(x + i) : key, lanes));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kept + count),
                          _mm256_permutevar8x32_epi32(index, lanes));
      count += _mm_popcnt_u32(pass);
    }
    return count + Portable::Compact<D, kRaw>(x, i, end, t, keys + count, kept + count);
  }

  TOPK_AVX2 static int64_t Rank(const int32_t* keys, int64_t m8, int64_t i) {
    // Candidates before i's vector count when at least as large, those after when larger; in
    // i's own vector, lanes split at i's lane.
    const __m256i key = _mm256_set1_epi32(keys[i]);
    const int64_t own = i / 8 * 8;
    __m256i rank = _mm256_setzero_si256();  // lanes: minus (smaller before) + (larger after)
    for (int64_t j = 0; j < own; j += 8) {
      const __m256i other = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
      rank = _mm256_add_epi32(rank, _mm256_cmpgt_epi32(key, other));
    }
    for (int64_t j = own + 8; j < m8; j += 8) {
      const __m256i other = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
      rank = _mm256_sub_epi32(rank, _mm256_cmpgt_epi32(other, key));
    }
    const __m256i other = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + own));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i at = _mm256_set1_epi32(static_cast<int32_t>(i - own));
    const __m256i before = _mm256_andnot_si256(_mm256_cmpgt_epi32(key, other),
                                               _mm256_cmpgt_epi32(at, lane));
    const __m256i after =
        _mm256_and_si256(_mm256_cmpgt_epi32(other, key), _mm256_cmpgt_epi32(lane, at));
    const int mine = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(before, after)));
    return own + Sum(rank) + _mm_popcnt_u32(mine);
  }
};
#endif

// Number of strided blocks: at least k (k maxima are needed), more tighten the bound; at least
// 16 entries a block while that allows, a multiple of the vector width, and at most n.
int64_t Blocks(int64_t n, int64_t k) {
  const int64_t w = std::max(k, std::min(4 * k, n / 16));
  return std::min(n, (w + 7) / 8 * 8);
}

// Candidates above which the all-pairs ranking (O(m^2)) gives way to nth_element and a sort.
constexpr int64_t kRankLimit = 256;

// A threshold t with at least k block maxima at or above it (so the row's k-th largest key is at
// least t), nearly the k-th largest maximum: bisection stops once no more than k + k / 16 blocks
// reach t, each of which adds about one candidate.
template <typename Isa>
int32_t Threshold(const int32_t* maxima, int64_t w, int64_t k) {
  int64_t low = *std::min_element(maxima, maxima + w);
  int64_t high = int64_t{*std::max_element(maxima, maxima + w)} + 1;
  int64_t reach = w;  // at low
  while (high - low > 1 && reach > k + k / 16) {
    const int64_t mid = low + (high - low) / 2;
    const int64_t count = Isa::CountAtLeast(maxima, w, static_cast<int32_t>(mid));
    if (count >= k) {
      low = mid;
      reach = count;
    } else {
      high = mid;
    }
  }
  return static_cast<int32_t>(low);
}

// Appends the keys and indices of x[0, n) with key >= t to (keys, kept); returns how many.
template <typename D, typename Isa>
int64_t Candidates(const typename D::T* x, int64_t n, int32_t t, int32_t* keys, int32_t* kept) {
  return t >= 0 && t <= D::kRawExactUpTo ? Isa::template Compact<D, true>(x, 0, n, t, keys, kept)
                                         : Isa::template Compact<D, false>(x, 0, n, t, keys, kept);
}

// Writes the indices of the k largest of m >= k candidates (keys, kept), in index order, to
// indices[0, k) in order.
template <typename Isa>
void Order(int32_t* keys, const int32_t* kept, int64_t m, int64_t k, int32_t* indices,
           Scratch& scratch) {
  if (m <= kRankLimit) {
    const int64_t m8 = (m + 7) / 8 * 8;
    std::fill(keys + m, keys + m8, INT32_MIN);
    for (int64_t c = 0; c < m; ++c) {
      const int64_t rank = Isa::Rank(keys, m8, c);
      if (rank < k) indices[rank] = kept[c];
    }
    return;
  }
  int64_t* packed = scratch.packed.data();
  for (int64_t c = 0; c < m; ++c) packed[c] = Pack(keys[c], kept[c]);
  std::nth_element(packed, packed + (k - 1), packed + m, std::greater<int64_t>());
  std::sort(packed, packed + k, std::greater<int64_t>());
  for (int64_t j = 0; j < k; ++j) indices[j] = Unpack(packed[j]);
}

// Indices of the top k of one row x[0, n), 1 <= k <= n, in order.
template <typename D, typename Isa>
void TopIndices(const typename D::T* x, int64_t n, int64_t k, int32_t* indices,
                Scratch& scratch) {
  const int64_t w = Blocks(n, k);
  int32_t* high = scratch.high.data();
  int32_t* low = scratch.low.data();
  const int64_t stripes = n / w;
  Isa::template Extrema<D>(x, stripes, w, high, low);
  Isa::template ExtremaInto<D>(x + stripes * w, 0, n - stripes * w, high, low);
  // A block's largest key is its largest raw bits if any is non-negative, else its smallest.
  for (int64_t b = 0; b < w; ++b) high[b] = D::KeyOfRaw(high[b] >= 0 ? high[b] : low[b]);
  const int32_t t = Threshold<Isa>(high, w, k);
  int32_t* keys = scratch.keys.data();
  int32_t* kept = scratch.kept.data();
  int64_t m = Candidates<D, Isa>(x, n, t, keys, kept);
  if (m > std::max(kRankLimit, 2 * k) && t < INT32_MAX) {
    // Many ties at t (masked keys, padded queries, constant rows): the entries above t hold the
    // top k if there are k of them; otherwise all of them lead and the first ties follow. (A
    // vector pass over the row, which skips the many tied entries, beats filtering the candidates,
    // which touches each of them.)
    m = Candidates<D, Isa>(x, n, t + 1, keys, kept);
    if (m < k) {
      Order<Isa>(keys, kept, m, m, indices, scratch);
      for (int64_t i = 0; m < k; ++i) {
        if (D::Key(x[i]) == t) indices[m++] = static_cast<int32_t>(i);
      }
      return;
    }
  }
  Order<Isa>(keys, kept, m, k, indices, scratch);
}

// Top k of one row x[0, n), 1 <= k <= n.
template <typename D, typename Isa>
void SelectRow(const typename D::T* x, int64_t n, int64_t k, typename D::T* values,
               int32_t* indices, Scratch& scratch) {
  TopIndices<D, Isa>(x, n, k, indices, scratch);
  for (int64_t j = 0; j < k; ++j) values[j] = D::Canonical(x[indices[j]]);
}

// Rows claimed in chunks by the caller and by pool tasks; tasks that start after all rows are
// claimed find nothing to do, so the caller only waits for chunks that are being processed.
struct Work {
  int64_t rows, n, k, chunk;
  std::function<void(int64_t, Scratch&)> row;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Run() {
    if (next.load() >= rows) return;  // Started late: every row is claimed already.
    Scratch scratch(n);
    int64_t start;
    while ((start = next.fetch_add(chunk)) < rows) {
      const int64_t end = std::min(rows, start + chunk);
      for (int64_t r = start; r < end; ++r) row(r, scratch);
      if (done.fetch_add(end - start) + (end - start) == rows) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

template <typename D, typename Isa>
void SelectRows(ffi::ThreadPool& pool, const void* in, void* values, int32_t* indices,
                int64_t rows, int64_t n, int64_t k) {
  using T = typename D::T;
  const T* x = static_cast<const T*>(in);
  T* v = static_cast<T*>(values);
  auto work = std::make_shared<Work>();
  work->rows = rows;
  work->n = n;
  work->k = k;
  // About 64K elements per claim: large enough to amortise the atomics, small enough to balance.
  work->chunk = std::max<int64_t>(1, (int64_t{1} << 16) / n);
  work->row = [=](int64_t r, Scratch& scratch) {
    Isa::Within([&] { SelectRow<D, Isa>(x + r * n, n, k, v + r * k, indices + r * k, scratch); });
  };
  const int64_t chunks = (rows + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == rows; });
}

bool HasAvx2() {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return avx2;
#else
  return false;
#endif
}

template <typename D>
void SelectRowsOn([[maybe_unused]] bool vectorized, ffi::ThreadPool& pool, const void* in,
                  void* values, int32_t* indices, int64_t rows, int64_t n, int64_t k) {
#if defined(__x86_64__)
  if (vectorized && HasAvx2()) return SelectRows<D, Avx2>(pool, in, values, indices, rows, n, k);
#endif
  SelectRows<D, Portable>(pool, in, values, indices, rows, n, k);
}

// `vectorized` false forces the portable steps (for tests) where AVX2 would be used.
ffi::Error TopkSelectImpl(ffi::ThreadPool pool, ffi::AnyBuffer scores,
                          ffi::Result<ffi::AnyBuffer> values,
                          ffi::Result<ffi::Buffer<ffi::S32>> indices, bool vectorized) {
  const auto dims = scores.dimensions();
  if (dims.size() == 0) {
    return ffi::Error::InvalidArgument("topk_select: scores must have rank >= 1");
  }
  const int64_t n = dims.back();
  const int64_t k = indices->dimensions().back();
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(scores.element_count()) / n;
  if (k > n) return ffi::Error::InvalidArgument("topk_select: k exceeds the last axis");
  if (n > INT32_MAX) return ffi::Error::InvalidArgument("topk_select: last axis exceeds int32");
  if (values->element_type() != scores.element_type())
    return ffi::Error::InvalidArgument("topk_select: values dtype differs from scores dtype");
  if (k == 0 || rows == 0) return ffi::Error::Success();
  switch (scores.element_type()) {
    case ffi::DataType::F32:
      SelectRowsOn<F32>(vectorized, pool, scores.untyped_data(), values->untyped_data(),
                              indices->typed_data(), rows, n, k);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      SelectRowsOn<BF16>(vectorized, pool, scores.untyped_data(), values->untyped_data(),
                               indices->typed_data(), rows, n, k);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("topk_select: scores must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TopkSelect, TopkSelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("vectorized"));

// The instruction set the kernel uses on this machine when vectorized: "avx2" or "portable".
extern "C" const char* TopkSelectIsa() { return HasAvx2() ? "avx2" : "portable"; }
