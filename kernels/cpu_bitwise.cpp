// Bitwise CPU kernels of dbgen: the packed ops of the binary layers on the CPU (dbgen/kernels/cpu.py calls them).
//
// The fully binary (1/1) conv and linear work on packed sign words (dbgen/kernels/packing.py has the layouts):
// activations (N, H, W, Cw) uint32 with channel c at bit c % 32 of word c / 32, and the weight rows of
// K = KH * KW * Cw words in (tap, word) order, here transposed to (K, O). For every output pixel the kernel
// gathers the K words under its window (zero words where the window overhangs the image: an implicit im2col),
// counts their bits (xs, the +1 inputs) and sums AND-popcounts against every output channel:
//
//   p[i, o] = sum_k popcount(col_i[k] & w[o, k]),   dot = 4 p - 2 xs + cv[i, o]   (the exact +-1 product)
//
// with cv[i, o] the sum over the window's taps inside the image of tap_corr[t, o] = -(sum of tap t's +-1 weights)
//
// then the layers' epilogue y = float32(dot) * scale[o] + bias[o], each operation rounded to float32 as the
// reference and the CUDA kernels do (built with -ffp-contract=off, so no multiply-add is fused), written as
// float (N, O, Ho, Wo), or only the signs y >= 0 packed into the next layer's words (N, Ho, Wo, Ow).
//
// The popcount core (16 pixels against all output channels) has one version per instruction set, all
// computing the same integers; the caller picks one from what the CPU supports (dbgen_cpu_isas) or what
// DBGEN_CPU_ISA forces:
//
//   0 scalar           portable C++ (the compiler's popcount builtin; no ISA extension assumed)
//   1 avx2             256-bit AND, popcount by nibble lookup (vpshufb), 8 channels per vector
//   2 avx512bw         512-bit AND, the same nibble lookup, 16 channels per vector
//   3 avx512vpopcntdq  512-bit AND, vpopcntd (Ice Lake and later, Zen 4), 16 channels per vector
//
// Also here, memory-bound and plain C++: packing float32 signs into words (NCHW or rows), and expanding packed
// weights into a float32 weight of +-scale for the packed-weight (float activation) ops.
//
// Built with g++ into a plain shared library (no torch headers) and called through ctypes. Work is split over
// `threads` std::threads (the caller passes torch's thread count), only where each thread gets enough work.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int kAbiVersion = 3;
constexpr int kBlock = 16;  // output pixels per block: one 64-byte line of each output channel's floats

// The popcount core: p[r * O + o] = sum_k popcount(a[r][k] & wT[k * O + o]) for the kBlock rows a (gathered
// windows of K words; rows past the block's end point at zeros) against every weight column o of wT (K, O),
// the weights transposed so that one vector holds a word of 8 or 16 consecutive output channels: each lane
// sums its own channel's count, and no horizontal reduction is ever needed.
using DotsFn = void (*)(const uint32_t* const* a, const uint32_t* wT, int64_t K, int64_t O, int32_t* p);

// ------------------------------------------------------------------------------------------------ scalar
void dots_scalar(const uint32_t* const* a, const uint32_t* wT, int64_t K, int64_t O, int32_t* p) {
  std::fill(p, p + kBlock * O, 0);
  for (int r = 0; r < kBlock; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t x = a[r][k];
      const uint32_t* w = wT + k * O;
      for (int64_t o = 0; o < O; ++o) p[r * O + o] += __builtin_popcount(x & w[o]);
    }
}

// -------------------------------------------------------------------------------------------------- AVX2
// Nibble lookup (vpshufb) gives each byte's count; byte sums are kept for up to 31 words (31 x 8 < 256), then
// widened to the 32-bit lanes (vpmaddubsw, vpmaddwd) and added to p in memory. 2 rows x 16 channels at a time.
__attribute__((target("avx2"))) inline __m256i popcount_bytes_avx2(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                                       2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

__attribute__((target("avx2"))) inline void flush_avx2(__m256i& bytes, int32_t* p, __m256i mask) {
  const __m256i words = _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
  _mm256_maskstore_epi32(p, mask, _mm256_add_epi32(_mm256_maskload_epi32(p, mask), words));
  bytes = _mm256_setzero_si256();
}

__attribute__((target("avx2"))) void dots_avx2(const uint32_t* const* a, const uint32_t* wT, int64_t K, int64_t O,
                                                int32_t* p) {
  std::fill(p, p + kBlock * O, 0);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t o = 0; o < O; o += 16) {
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(O - o)), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(O - o - 8)), lane);
    for (int r = 0; r < kBlock; r += 2) {
      __m256i acc[2][2] = {};
      for (int64_t k = 0; k < K; ++k) {
        const __m256i w0 = _mm256_maskload_epi32(reinterpret_cast<const int*>(wT + k * O + o), m0);
        const __m256i w1 = _mm256_maskload_epi32(reinterpret_cast<const int*>(wT + k * O + o + 8), m1);
        for (int i = 0; i < 2; ++i) {
          const __m256i x = _mm256_set1_epi32(static_cast<int>(a[r + i][k]));
          acc[i][0] = _mm256_add_epi8(acc[i][0], popcount_bytes_avx2(_mm256_and_si256(x, w0)));
          acc[i][1] = _mm256_add_epi8(acc[i][1], popcount_bytes_avx2(_mm256_and_si256(x, w1)));
        }
        if (k % 31 == 30 || k == K - 1) {
          for (int i = 0; i < 2; ++i) {
            flush_avx2(acc[i][0], p + (r + i) * O + o, m0);
            flush_avx2(acc[i][1], p + (r + i) * O + o + 8, m1);
          }
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------- AVX-512
// 16 output channels per vector, the last vector of a row masked; 8 rows x 32 channels at a time.
__attribute__((target("avx512f,avx512bw"))) inline __m512i popcount_bytes_avx512bw(__m512i v) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i lo = _mm512_and_si512(v, low);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
  return _mm512_add_epi8(_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi));
}

__attribute__((target("avx512f,avx512bw"))) inline void flush_avx512bw(__m512i& bytes, int32_t* p, __mmask16 m) {
  const __m512i words = _mm512_madd_epi16(_mm512_maddubs_epi16(bytes, _mm512_set1_epi8(1)), _mm512_set1_epi16(1));
  _mm512_mask_storeu_epi32(p, m, _mm512_add_epi32(_mm512_maskz_loadu_epi32(m, p), words));
  bytes = _mm512_setzero_si512();
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }

__attribute__((target("avx512f,avx512bw"))) void dots_avx512bw(const uint32_t* const* a, const uint32_t* wT,
                                                                int64_t K, int64_t O, int32_t* p) {
  std::fill(p, p + kBlock * O, 0);
  for (int64_t o = 0; o < O; o += 32) {
    const __mmask16 m0 = lanes(O - o), m1 = lanes(O - o - 16);
    for (int r = 0; r < kBlock; r += 8) {
      __m512i acc[8][2];
      for (auto& row : acc) row[0] = row[1] = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; ++k) {
        const __m512i w0 = _mm512_maskz_loadu_epi32(m0, wT + k * O + o);
        const __m512i w1 = _mm512_maskz_loadu_epi32(m1, wT + k * O + o + 16);
        for (int i = 0; i < 8; ++i) {
          const __m512i x = _mm512_set1_epi32(static_cast<int>(a[r + i][k]));
          acc[i][0] = _mm512_add_epi8(acc[i][0], popcount_bytes_avx512bw(_mm512_and_si512(x, w0)));
          acc[i][1] = _mm512_add_epi8(acc[i][1], popcount_bytes_avx512bw(_mm512_and_si512(x, w1)));
        }
        if (k % 31 == 30 || k == K - 1) {
          for (int i = 0; i < 8; ++i) {
            flush_avx512bw(acc[i][0], p + (r + i) * O + o, m0);
            flush_avx512bw(acc[i][1], p + (r + i) * O + o + 16, m1);
          }
        }
      }
    }
  }
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void dots_avx512vpopcntdq(const uint32_t* const* a,
                                                                              const uint32_t* wT, int64_t K,
                                                                              int64_t O, int32_t* p) {
  for (int64_t o = 0; o < O; o += 32) {
    const __mmask16 m0 = lanes(O - o), m1 = lanes(O - o - 16);
    for (int r = 0; r < kBlock; r += 8) {
      __m512i acc[8][2];
      for (auto& row : acc) row[0] = row[1] = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; ++k) {
        const __m512i w0 = _mm512_maskz_loadu_epi32(m0, wT + k * O + o);
        const __m512i w1 = _mm512_maskz_loadu_epi32(m1, wT + k * O + o + 16);
        for (int i = 0; i < 8; ++i) {
          const __m512i x = _mm512_set1_epi32(static_cast<int>(a[r + i][k]));
          acc[i][0] = _mm512_add_epi32(acc[i][0], _mm512_popcnt_epi32(_mm512_and_si512(x, w0)));
          acc[i][1] = _mm512_add_epi32(acc[i][1], _mm512_popcnt_epi32(_mm512_and_si512(x, w1)));
        }
      }
      for (int i = 0; i < 8; ++i) {
        _mm512_mask_storeu_epi32(p + (r + i) * O + o, m0, acc[i][0]);
        _mm512_mask_storeu_epi32(p + (r + i) * O + o + 16, m1, acc[i][1]);
      }
    }
  }
}

bool supports(int isa) {
  __builtin_cpu_init();
  switch (isa) {
    case 0:
      return true;
    case 1:
      return __builtin_cpu_supports("avx2");
    case 2:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    case 3:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
    default:
      return false;
  }
}

constexpr DotsFn kDots[] = {dots_scalar, dots_avx2, dots_avx512bw, dots_avx512vpopcntdq};

// fn(i0, i1) over [0, n) split into up to `threads` ranges, each worth at least ~1M word operations (`work` in
// all): a thread costs tens of microseconds to start.
template <class Fn>
void parallel(int64_t n, int64_t work, int threads, const Fn& fn) {
  const int64_t useful = std::max<int64_t>(1, work / (1 << 20));
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(threads), useful, n}));
  const int64_t per = (n + count - 1) / std::max<int64_t>(count, 1);
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < count; ++t) {
    const int64_t i0 = t * per, i1 = std::min(n, i0 + per);
    if (i0 >= i1) continue;
    try {
      pool.emplace_back(fn, i0, i1);
    } catch (...) {  // the host refused a thread (e.g. a process limit): this range runs here instead
      fn(i0, i1);
    }
  }
  fn(0, std::min(n, per));
  for (auto& th : pool) th.join();
}

int popcount_words(const uint32_t* w, int64_t n) {
  int total = 0;
  for (int64_t k = 0; k < n; ++k) total += __builtin_popcount(w[k]);
  return total;
}

// The fully binary conv (see the top of this file). A linear layer is the 1x1 case over M "pixels".
struct Conv {
  const uint32_t* x;  // (N, H, W, Cw)
  int64_t N, H, W, Cw;
  const uint32_t* wT;  // (K, O), K = KH * KW * Cw in (tap, word) order: the weight rows transposed
  int64_t O, KH, KW, sh, sw, ph, pw, Ho, Wo;
  const int32_t* tap_corr;  // (T, O): -(sum of a tap's +-1 weights), by tap (null for the plain product)
  const float* scale;    // (O,) or null
  const float* bias;     // (O,) or null
  float* out;            // (N, O, Ho, Wo) float32, or null
  uint32_t* out_words;   // (N, Ho, Wo, ceil(O / 32)), or null
  int64_t* out_product;  // (N * Ho * Wo, O) int64: the plain p (and_popcount_matmul), or null

  int64_t K() const { return KH * KW * Cw; }

  // Gathers output pixel i's window into row (K words) and returns its +1 bits; cv[i] points at the pixel's
  // valid-tap correction (sum of tap_corr over the taps inside the image): all (the interior's, every tap
  // valid), or the row of cv_rows where it is summed for a pixel whose window overhangs the image.
  int64_t gather(int64_t i, uint32_t* row, const int32_t* all, int32_t* cv_row, const int32_t** cv) const {
    const int64_t hw = Ho * Wo, n = i / hw, y = i % hw / Wo, xo = i % Wo;
    int64_t ones = 0;
    bool border = false;
    for (int64_t ky = 0; ky < KH; ++ky) {
      const int64_t iy = y * sh - ph + ky;
      for (int64_t kx = 0; kx < KW; ++kx) {
        const int64_t ix = xo * sw - pw + kx;
        uint32_t* dst = row + (ky * KW + kx) * Cw;
        if (iy < 0 || iy >= H || ix < 0 || ix >= W) {
          std::memset(dst, 0, Cw * sizeof(uint32_t));
          border = true;
        } else {
          std::memcpy(dst, x + ((n * H + iy) * W + ix) * Cw, Cw * sizeof(uint32_t));
          ones += popcount_words(dst, Cw);
        }
      }
    }
    *cv = all;
    if (border && tap_corr) {
      std::fill(cv_row, cv_row + O, 0);
      for (int64_t ky = 0; ky < KH; ++ky)
        for (int64_t kx = 0; kx < KW; ++kx) {
          const int64_t iy = y * sh - ph + ky, ix = xo * sw - pw + kx;
          if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
          const int32_t* tc = tap_corr + (ky * KW + kx) * O;
          for (int64_t o = 0; o < O; ++o) cv_row[o] += tc[o];
        }
      *cv = cv_row;
    }
    return ones;
  }

  // Writes the outputs of pixels [i, i + rows) from their popcount sums p (rows, O), through y (rows, O).
  void emit(int64_t i, int64_t rows, const int64_t* xs, const int32_t* const* cv, const int32_t* p, float* y) const {
    if (out_product) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < O; ++o) out_product[(i + r) * O + o] = p[r * O + o];
      return;
    }
    const int64_t hw = Ho * Wo;
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* cv_q = cv[r];
      const int32_t xs2 = static_cast<int32_t>(2 * xs[r]);
      if (scale && bias) epilogue<true, true>(p + r * O, xs2, cv_q, y + r * O);
      else if (scale) epilogue<true, false>(p + r * O, xs2, cv_q, y + r * O);
      else if (bias) epilogue<false, true>(p + r * O, xs2, cv_q, y + r * O);
      else epilogue<false, false>(p + r * O, xs2, cv_q, y + r * O);
    }
    if (out) {  // channel by channel, so that the stores of consecutive pixels land in one cache line
      int64_t base[kBlock];
      for (int64_t r = 0; r < rows; ++r) base[r] = (i + r) / hw * O * hw + (i + r) % hw;
      for (int64_t o = 0; o < O; ++o)
        for (int64_t r = 0; r < rows; ++r) out[base[r] + o * hw] = y[r * O + o];
      return;
    }
    const int64_t ow = (O + 31) / 32;
    for (int64_t r = 0; r < rows; ++r) {
      const float* yr = y + r * O;
      for (int64_t j = 0; j < O / 32; ++j) {  // whole words: a fixed 32-step loop the compiler vectorizes
        uint32_t word = 0;
        for (int b = 0; b < 32; ++b) word |= static_cast<uint32_t>(yr[32 * j + b] >= 0.0f) << b;
        out_words[(i + r) * ow + j] = word;
      }
      if (O % 32) {
        uint32_t word = 0;
        for (int64_t o = O / 32 * 32; o < O; ++o) word |= static_cast<uint32_t>(yr[o] >= 0.0f) << (o % 32);
        out_words[(i + r) * ow + O / 32] = word;
      }
    }
  }

  // y[o] = float32(4 p[o] - 2 xs + cv[o]) * scale[o] + bias[o], each operation rounded (a loop the compiler
  // vectorizes; |dot| <= 4 * 32 K fits int32, and its float conversion is the int64 one of the reference).
  template <bool kScale, bool kBias>
  void epilogue(const int32_t* p, int32_t xs2, const int32_t* cv_q, float* y) const {
    for (int64_t o = 0; o < O; ++o) {
      float v = static_cast<float>(4 * p[o] - xs2 + cv_q[o]);
      if (kScale) v = v * scale[o];
      if (kBias) v = v + bias[o];
      y[o] = v;
    }
  }

  // Output pixels [i0, i1), kBlock at a time against every output channel.
  void pixels(DotsFn dots, int64_t i0, int64_t i1) const {
    const int64_t k = K();
    std::vector<uint32_t> cols(kBlock * k + k, 0);  // kBlock windows, then a zero row for a short block
    std::vector<int32_t> p(kBlock * O), cv_rows(kBlock * O), all(O, 0);
    std::vector<float> y(kBlock * O);
    for (int64_t t = 0; tap_corr && t < KH * KW; ++t)
      for (int64_t o = 0; o < O; ++o) all[o] += tap_corr[t * O + o];
    int64_t xs[kBlock];
    const int32_t* cv[kBlock];
    for (int64_t i = i0; i < i1; i += kBlock) {
      const int64_t rows = std::min<int64_t>(kBlock, i1 - i);
      const uint32_t* a[kBlock];
      for (int64_t r = 0; r < kBlock; ++r) {
        a[r] = cols.data() + (r < rows ? r : kBlock) * k;
        if (r < rows) xs[r] = gather(i + r, cols.data() + r * k, all.data(), cv_rows.data() + r * O, &cv[r]);
      }
      dots(a, wT, k, O, p.data());
      emit(i, rows, xs, cv, p.data(), y.data());
    }
  }
};

int run(const Conv& conv, int isa, int threads) {
  if (conv.N < 0 || conv.O < 0 || conv.Cw < 0 || conv.Ho < 0 || conv.Wo < 0) return 2;
  if (isa < 0 || isa > 3 || !supports(isa)) return 1;
  const DotsFn dots = kDots[isa];
  const int64_t pixels = conv.N * conv.Ho * conv.Wo;
  parallel(pixels, pixels * conv.O * std::max<int64_t>(conv.K(), 1), threads,
           [&](int64_t i0, int64_t i1) { conv.pixels(dots, i0, i1); });
  return 0;
}

// One output channel's weight (C, T) of +-s from its packed row (T taps of cw words), in place: for 16 channels
// at a time the taps' bits of each channel are gathered into one mask (bit t: tap t), which selects T floats
// stored at once. T <= 32.
__attribute__((target("avx512f"))) void signed_row_avx512(const uint32_t* words, int64_t C, int64_t T, int64_t cw,
                                                           float s, float* dst) {
  const __m512 pos = _mm512_set1_ps(s), neg = _mm512_set1_ps(-s);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) uint32_t masks[16];
  for (int64_t c = 0; c < C; c += 16) {
    const int64_t n = std::min<int64_t>(16, C - c);
    if (T == 1) {  // the bits are the mask
      const __mmask16 bits = static_cast<__mmask16>(words[c / 32] >> (c % 32));
      _mm512_mask_storeu_ps(dst + c, lanes(n), _mm512_mask_blend_ps(bits, neg, pos));
      continue;
    }
    const __m512i shift = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(c % 32)));
    __m512i m = _mm512_setzero_si512();
    for (int64_t t = 0; t < T; ++t) {
      const __m512i word = _mm512_set1_epi32(static_cast<int>(words[t * cw + c / 32]));
      const __m512i bit = _mm512_and_si512(_mm512_srlv_epi32(word, shift), one);
      m = _mm512_or_si512(m, _mm512_sllv_epi32(bit, _mm512_set1_epi32(static_cast<int>(t))));
    }
    _mm512_store_si512(masks, m);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t0 = 0; t0 < T; t0 += 16)
        _mm512_mask_storeu_ps(dst + (c + i) * T + t0, lanes(T - t0),
                              _mm512_mask_blend_ps(static_cast<__mmask16>(masks[i] >> t0), neg, pos));
  }
}
}  // namespace

extern "C" {

int dbgen_cpu_abi_version() { return kAbiVersion; }

// Bit `isa` set for every path this CPU can run.
int dbgen_cpu_isas() {
  int mask = 0;
  for (int isa = 0; isa < 4; ++isa) mask |= supports(isa) ? 1 << isa : 0;
  return mask;
}

// The return codes: 0 on success; 1: the CPU lacks `isa`; 2: bad sizes.

// p = a AND-popcount b for words a (M, K) and bT (K, O) (b transposed), into out (M, O) int64.
int dbgen_and_popcount_matmul(const uint32_t* a, const uint32_t* bT, int64_t* out, int64_t M, int64_t O, int64_t K,
                              int isa, int threads) {
  Conv conv{a, M, 1, 1, K, bT, O, 1, 1, 1, 1, 0, 0, 1, 1, nullptr, nullptr, nullptr, nullptr, nullptr, out};
  return run(conv, isa, threads);
}

// The fully binary conv (the top of this file): x (N, H, W, Cw), wT (KH * KW * Cw, O), tap_corr (KH * KW, O)
// int32, scale and bias (O,) float32 or null; the result in exactly one of out (N, O, Ho, Wo) float32 or
// out_words (N, Ho, Wo, ceil(O / 32)).
int dbgen_binary_conv2d(const uint32_t* x, int64_t N, int64_t H, int64_t W, int64_t Cw, const uint32_t* wT,
                        int64_t O, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                        const int32_t* tap_corr, const float* scale, const float* bias, float* out, uint32_t* out_words,
                        int isa, int threads) {
  if (sh < 1 || sw < 1 || ph < 0 || pw < 0 || !tap_corr || !out == !out_words) return 2;
  const int64_t ho = (H + 2 * ph - KH) / sh + 1, wo = (W + 2 * pw - KW) / sw + 1;
  Conv conv{x, N, H, W, Cw, wT, O, KH, KW, sh, sw, ph, pw, ho, wo, tap_corr, scale, bias, out, out_words, nullptr};
  return run(conv, isa, threads);
}

// Signs (x >= 0: bit 1) of float32 x (N, C, HW) into words (N, HW, ceil(C / 32)); unused high bits 0.
int dbgen_pack_signs_nchw(const float* x, int64_t N, int64_t C, int64_t HW, uint32_t* out, int threads) {
  if (N < 0 || C < 1 || HW < 0) return 2;
  const int64_t cw = (C + 31) / 32;
  parallel(N * cw, N * C * HW / 8, threads, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> acc(HW);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / cw, j = t % cw;
      std::fill(acc.begin(), acc.end(), 0u);
      for (int64_t b = 0; b < 32 && 32 * j + b < C; ++b) {
        const float* src = x + (n * C + 32 * j + b) * HW;
        for (int64_t q = 0; q < HW; ++q) acc[q] |= static_cast<uint32_t>(src[q] >= 0.0f) << b;
      }
      for (int64_t q = 0; q < HW; ++q) out[(n * HW + q) * cw + j] = acc[q];
    }
  });
  return 0;
}

// Signs of float32 rows x (M, C) into words (M, ceil(C / 32)).
int dbgen_pack_signs_rows(const float* x, int64_t M, int64_t C, uint32_t* out, int threads) {
  if (M < 0 || C < 1) return 2;
  const int64_t cw = (C + 31) / 32;
  parallel(M, M * C / 8, threads, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t j = 0; j < cw; ++j) {
        uint32_t word = 0;
        for (int64_t b = 0; b < 32 && 32 * j + b < C; ++b)
          word |= static_cast<uint32_t>(x[m * C + 32 * j + b] >= 0.0f) << b;
        out[m * cw + j] = word;
      }
  });
  return 0;
}

// Packed weight rows w (O, Kw) (taps' channel words, then padding) into float32 out (O, C, T), the conv weight
// (O, C, KH, KW): +scale[o] for a 1 bit, -scale[o] for a 0 (+-1 without scale). AVX-512: a mask select per
// channel (signed_row_avx512); elsewhere each row is expanded in tap order into a buffer (each byte of bits
// becomes 8 floats read from a table of the 256 +-1 patterns and scaled), then transposed into place.
int dbgen_unpack_weight(const uint32_t* w, int64_t O, int64_t Kw, int64_t C, int64_t T, const float* scale,
                        float* out, int isa, int threads) {
  const int64_t cw = (C + 31) / 32;
  if (O < 0 || C < 1 || T < 1 || Kw < T * cw) return 2;
  if (isa < 0 || isa > 3 || !supports(isa)) return 1;
  static const std::vector<float> patterns = [] {
    std::vector<float> t(256 * 8);
    for (int byte = 0; byte < 256; ++byte)
      for (int b = 0; b < 8; ++b) t[byte * 8 + b] = (byte >> b & 1) ? 1.0f : -1.0f;
    return t;
  }();
  const bool avx512 = isa >= 2 && T <= 32;  // the AVX-512 paths (AVX-512F's mask select); else the table
  parallel(O, O * C * T / 8, threads, [&](int64_t o0, int64_t o1) {
    std::vector<float> taps(T * cw * 32);  // one row, (T, C) with each tap's channels padded to whole words
    for (int64_t o = o0; o < o1; ++o) {
      const float s = scale ? scale[o] : 1.0f;
      const uint32_t* words = w + o * Kw;
      float* dst = out + o * C * T;
      if (avx512) {
        signed_row_avx512(words, C, T, cw, s, dst);
        continue;
      }
      for (int64_t j = 0; j < T * cw; ++j)
        for (int byte = 0; byte < 4; ++byte) {
          const float* pattern = patterns.data() + (words[j] >> (8 * byte) & 0xFF) * 8;
          for (int b = 0; b < 8; ++b) taps[32 * j + 8 * byte + b] = pattern[b] * s;
        }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < T; ++t) dst[c * T + t] = taps[t * cw * 32 + c];
    }
  });
  return 0;
}

}  // extern "C"
