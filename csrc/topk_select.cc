// Exact top-k along the last axis for XLA:CPU, registered with JAX through the XLA FFI.
//
// Contract of lax.top_k on CPU: values in descending order under the IEEE total order
// (-NaN < -inf < ... < -0 < +0 < ... < inf < +NaN, NaNs ordered by payload), int32 indices,
// ties broken by the lower index first.
//
// Per row: every float maps to an int32 key whose signed order is that total order. One
// vectorised pass takes block maxima; a value that k of them reach (bisected to nearly the k-th
// largest maximum) bounds the k-th largest key from below, so a second pass over the blocks that
// reach it keeps only the entries at or above it, and nth_element over those packed
// (key, index) candidates finds the top k. Rows are shared out over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__SSE4_1__)
#include <smmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Signed key whose order is the IEEE total order of the float with these bits.
inline int32_t TotalOrderKey(uint32_t bits) {
  int32_t s = static_cast<int32_t>(bits);
  return s ^ static_cast<int32_t>(static_cast<uint32_t>(s >> 31) >> 1);
}

#if defined(__SSE4_1__)
inline __m128i TotalOrderKeys(__m128i bits) {
  return _mm_xor_si128(bits, _mm_srli_epi32(_mm_srai_epi32(bits, 31), 1));
}
#endif

struct F32 {
  using T = uint32_t;
  static T Canonical(T v) { return v; }
  static int32_t Key(T v) { return TotalOrderKey(v); }
#if defined(__SSE4_1__)
  static __m128i Keys4(const T* p) {
    return TotalOrderKeys(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#endif
};

// XLA compares bfloat16 after converting to float32, which turns every NaN into the quiet NaN of
// its sign, so such NaNs tie (and come back canonical); matched here.
struct BF16 {
  using T = uint16_t;
  static T Canonical(T v) {
    return (v & 0x7FFF) > 0x7F80 ? static_cast<T>((v & 0x8000) | 0x7FC0) : v;
  }
  static int32_t Key(T v) { return TotalOrderKey(static_cast<uint32_t>(Canonical(v)) << 16); }
#if defined(__SSE4_1__)
  static __m128i Keys4(const T* p) {
    const __m128i half = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i bits = _mm_unpacklo_epi16(_mm_setzero_si128(), half);
    const __m128i sign = _mm_and_si128(bits, _mm_set1_epi32(INT32_MIN));
    const __m128i nan = _mm_cmpgt_epi32(_mm_andnot_si128(sign, bits), _mm_set1_epi32(0x7F800000));
    const __m128i quiet = _mm_or_si128(sign, _mm_set1_epi32(0x7FC00000));
    return TotalOrderKeys(
        _mm_or_si128(_mm_and_si128(nan, quiet), _mm_andnot_si128(nan, bits)));
  }
#endif
};

// Candidate packed so that a larger int64 means a larger key, or an equal key at a lower index.
inline int64_t Pack(int32_t key, int64_t index) {
  return (static_cast<int64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

inline int64_t Unpack(int64_t packed) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(packed & 0xFFFFFFFF);
}

// Largest key of p[0, len).
template <typename D>
int32_t MaxKey(const typename D::T* p, int64_t len) {
  int32_t m = INT32_MIN;
  int64_t j = 0;
#if defined(__SSE4_1__)
  if (len >= 4) {
    __m128i acc = D::Keys4(p);
    for (j = 4; j + 4 <= len; j += 4) acc = _mm_max_epi32(acc, D::Keys4(p + j));
    acc = _mm_max_epi32(acc, _mm_shuffle_epi32(acc, _MM_SHUFFLE(1, 0, 3, 2)));
    acc = _mm_max_epi32(acc, _mm_shuffle_epi32(acc, _MM_SHUFFLE(2, 3, 0, 1)));
    m = _mm_cvtsi128_si32(acc);
  }
#endif
  for (; j < len; ++j) m = std::max(m, D::Key(p[j]));
  return m;
}

#if defined(__SSE4_1__)
// Byte shuffles that move the 32-bit lanes selected by a 4-bit mask to the front, in order.
struct LeftPack {
  LeftPack() {
    for (int mask = 0; mask < 16; ++mask) {
      int out = 0;
      for (int lane = 0; lane < 4; ++lane) {
        if (!(mask >> lane & 1)) continue;
        for (int byte = 0; byte < 4; ++byte) shuffle[mask][4 * out + byte] = 4 * lane + byte;
        ++out;
      }
      for (int byte = 4 * out; byte < 16; ++byte) shuffle[mask][byte] = 0x80;
    }
  }
  alignas(16) uint8_t shuffle[16][16];
};
const LeftPack kLeftPack;
#endif

// Appends the indices in [begin, end) whose key is at least `threshold` to `out` in order and
// returns how many; `out` needs 3 spare entries past the last index it keeps.
template <typename D>
int64_t Compact(const typename D::T* x, int64_t begin, int64_t end, int32_t threshold,
                int32_t* out) {
  int64_t count = 0;
  int64_t i = begin;
#if defined(__SSE4_1__)
  // Branch-free: whichever lanes pass are packed to the front and all four stored.
  const __m128i bound = _mm_set1_epi32(threshold);
  __m128i index =
      _mm_add_epi32(_mm_set1_epi32(static_cast<int32_t>(i)), _mm_setr_epi32(0, 1, 2, 3));
  for (; i + 4 <= end; i += 4) {
    const __m128i below = _mm_cmplt_epi32(D::Keys4(x + i), bound);
    const int pass = ~_mm_movemask_ps(_mm_castsi128_ps(below)) & 0xF;
    const __m128i shuffle =
        _mm_load_si128(reinterpret_cast<const __m128i*>(kLeftPack.shuffle[pass]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + count), _mm_shuffle_epi8(index, shuffle));
    count += __builtin_popcount(pass);
    index = _mm_add_epi32(index, _mm_set1_epi32(4));
  }
#endif
  for (; i < end; ++i) {
    out[count] = static_cast<int32_t>(i);
    count += D::Key(x[i]) >= threshold;
  }
  return count;
}

// Per-worker buffers, sized for rows of n entries.
struct Scratch {
  explicit Scratch(int64_t n) : maxima(n), kept(n + 3), candidates(n) {}
  std::vector<int32_t> maxima;  // per block of the row
  std::vector<int32_t> kept;    // indices at or above the threshold
  std::vector<int64_t> candidates;
};

// Top k of one row x[0, n), 1 <= k <= n.
template <typename D>
void SelectRow(const typename D::T* x, int64_t n, int64_t k, typename D::T* values,
               int32_t* indices, Scratch& scratch) {
  // Any t reached by k block maxima bounds the k-th largest key from below (k distinct entries
  // reach it), and only blocks whose maximum reaches t hold candidates. More blocks tighten the
  // bound; blocks of at least 16 keep the scan vectorised.
  const int64_t blocks = std::max(k, std::min(4 * k, n / 16));
  const int64_t size = n / blocks;
  int32_t* maxima = scratch.maxima.data();
  for (int64_t b = 0; b < blocks; ++b) {
    maxima[b] = MaxKey<D>(x + b * size, b == blocks - 1 ? n - b * size : size);
  }
  // Bisect for (nearly) the largest such t: all blocks reach `low`, fewer than k reach `high`.
  // A few steps leave the bound within a sliver of the k-th largest maximum.
  int64_t low = *std::min_element(maxima, maxima + blocks);
  int64_t high = int64_t{*std::max_element(maxima, maxima + blocks)} + 1;
  for (int step = 0; step < 16 && high - low > 1; ++step) {
    const int64_t mid = low + (high - low) / 2;
    int64_t reach = 0;
    for (int64_t b = 0; b < blocks; ++b) reach += maxima[b] >= mid;
    (reach >= k ? low : high) = mid;
  }
  const int32_t threshold = static_cast<int32_t>(low);
  int32_t* kept = scratch.kept.data();
  int64_t count = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (maxima[b] < threshold) continue;
    const int64_t end = b == blocks - 1 ? n : (b + 1) * size;
    count += Compact<D>(x, b * size, end, threshold, kept + count);
  }
  int64_t* candidates = scratch.candidates.data();
  for (int64_t c = 0; c < count; ++c) candidates[c] = Pack(D::Key(x[kept[c]]), kept[c]);
  std::nth_element(candidates, candidates + (k - 1), candidates + count,
                   std::greater<int64_t>());
  std::sort(candidates, candidates + (k - 1), std::greater<int64_t>());
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = Unpack(candidates[j]);
    values[j] = D::Canonical(x[i]);
    indices[j] = static_cast<int32_t>(i);
  }
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

template <typename D>
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
    SelectRow<D>(x + r * n, n, k, v + r * k, indices + r * k, scratch);
  };
  const int64_t chunks = (rows + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == rows; });
}

ffi::Error TopkSelectImpl(ffi::ThreadPool pool, ffi::AnyBuffer scores,
                          ffi::Result<ffi::AnyBuffer> values,
                          ffi::Result<ffi::Buffer<ffi::S32>> indices) {
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
      SelectRows<F32>(pool, scores.untyped_data(), values->untyped_data(),
                      indices->typed_data(), rows, n, k);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      SelectRows<BF16>(pool, scores.untyped_data(), values->untyped_data(),
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
                                  .Ret<ffi::Buffer<ffi::S32>>());
