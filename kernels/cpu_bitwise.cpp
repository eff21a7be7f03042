// Bitwise CPU kernels of dbgen: the AND-popcount product of packed sign words, the integer core of the fully
// binary (1/1) conv and linear layers (dbgen/kernels/packing.py derives the +-1 dot product from it exactly).
//
//   p[i, o] = sum_k popcount(a[i, k] & b[o, k])        a: (M, K) uint32 words, b: (O, K)
//
// either as it is (dbgen_and_popcount_matmul: int64 (M, O)) or through the binary layers' exact epilogue
// (dbgen_binary_dot_epilogue: the +-1 dot product 4 p - 2 xs[i] + cv[o, i % P], then float32(dot) * scale[o]
// + bias[o], each operation rounded to float32 as the reference and the CUDA kernels do; built with
// -ffp-contract=off so that no multiply-add is fused).
//
// Built with g++ into a plain shared library (no torch headers) and called through ctypes by
// dbgen/kernels/cpu.py. One library holds every instruction-set path (each function compiled for its own
// target); the caller picks one from what the CPU supports (dbgen_cpu_isas) or what DBGEN_CPU_ISA forces:
//
//   0 scalar           portable C++ (the compiler's popcount builtin; no ISA extension assumed)
//   1 avx2             256-bit AND, popcount by nibble lookup (vpshufb), bytes summed with vpsadbw
//   2 avx512bw         512-bit AND, the same nibble lookup on 64 bytes
//   3 avx512vpopcntdq  512-bit AND, vpopcntq (Ice Lake and later, Zen 4)
//
// K must be a multiple of 16 words (64 bytes: one 512-bit vector); the caller pads both operands with zero
// words, which add nothing. Rows are split over `threads` std::threads (the caller passes torch's thread
// count). Every path computes the same integers: results are compared exactly with the PyTorch reference.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

namespace {

constexpr int kAbiVersion = 2;
constexpr int64_t kOutBlock = 4;  // output rows o sharing one load of the activation row

// What a kernel does with each finished popcount sum p of row i and output o.
struct Product {  // the plain product
  int64_t* out;
  int64_t O;
  void operator()(int64_t i, int64_t o, int64_t p) const { out[i * O + o] = p; }
};

struct Epilogue {  // the binary layer's output (see the top of this file)
  const int64_t* xs;
  const int32_t* cv;
  int64_t P;
  const float* scale;
  const float* bias;
  float* out;
  int64_t O;
  void operator()(int64_t i, int64_t o, int64_t p) const {
    const int64_t dot = 4 * p - 2 * xs[i] + cv[o * P + i % P];
    float y = static_cast<float>(dot);
    if (scale) y = y * scale[o];
    if (bias) y = y + bias[o];
    out[i * O + o] = y;
  }
};

// ------------------------------------------------------------------------------------------------ scalar
template <class Emit>
void rows_scalar(const uint32_t* a, const uint32_t* b, const Emit& emit, int64_t i0, int64_t i1, int64_t O,
                 int64_t K) {
  const int64_t k64 = K / 2;
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t* ai = a + i * K;
    for (int64_t o = 0; o < O; ++o) {
      const uint32_t* bo = b + o * K;
      int64_t sum = 0;
      for (int64_t k = 0; k < k64; ++k) {
        uint64_t x, y;
        std::memcpy(&x, ai + 2 * k, 8);
        std::memcpy(&y, bo + 2 * k, 8);
        sum += __builtin_popcountll(x & y);
      }
      emit(i, o, sum);
    }
  }
}

// -------------------------------------------------------------------------------------------------- AVX2
__attribute__((target("avx2"))) inline __m256i popcount_bytes_avx2(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                                       2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

__attribute__((target("avx2"))) inline int64_t hsum_avx2(__m256i v) {
  return _mm256_extract_epi64(v, 0) + _mm256_extract_epi64(v, 1) + _mm256_extract_epi64(v, 2) +
         _mm256_extract_epi64(v, 3);
}

template <class Emit>
__attribute__((target("avx2"))) void rows_avx2(const uint32_t* a, const uint32_t* b, const Emit& emit, int64_t i0,
                                                int64_t i1, int64_t O, int64_t K) {
  const int64_t nv = K / 8;  // 256-bit vectors per row
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t* ai = a + i * K;
    int64_t o = 0;
    for (; o + kOutBlock <= O; o += kOutBlock) {
      __m256i total[kOutBlock], bytes[kOutBlock];
      for (int j = 0; j < kOutBlock; ++j) total[j] = bytes[j] = zero;
      for (int64_t v = 0; v < nv; ++v) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai) + v);
        for (int j = 0; j < kOutBlock; ++j) {
          const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (o + j) * K) + v);
          bytes[j] = _mm256_add_epi8(bytes[j], popcount_bytes_avx2(_mm256_and_si256(x, y)));
        }
        if ((v & 15) == 15 || v == nv - 1) {  // a byte holds at most 16 x 8 = 128 < 256: flush to 64-bit sums
          for (int j = 0; j < kOutBlock; ++j) {
            total[j] = _mm256_add_epi64(total[j], _mm256_sad_epu8(bytes[j], zero));
            bytes[j] = zero;
          }
        }
      }
      for (int j = 0; j < kOutBlock; ++j) emit(i, o + j, hsum_avx2(total[j]));
    }
    for (; o < O; ++o) {  // the last O % 4 output rows, one at a time
      __m256i total = zero, bytes = zero;
      for (int64_t v = 0; v < nv; ++v) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai) + v);
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + o * K) + v);
        bytes = _mm256_add_epi8(bytes, popcount_bytes_avx2(_mm256_and_si256(x, y)));
        if ((v & 15) == 15 || v == nv - 1) {
          total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes, zero));
          bytes = zero;
        }
      }
      emit(i, o, hsum_avx2(total));
    }
  }
}

// ----------------------------------------------------------------------------------------------- AVX-512
__attribute__((target("avx512f,avx512bw"))) inline __m512i popcount_bytes_avx512bw(__m512i v) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i lo = _mm512_and_si512(v, low);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
  return _mm512_add_epi8(_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi));
}

template <class Emit>
__attribute__((target("avx512f,avx512bw"))) void rows_avx512bw(const uint32_t* a, const uint32_t* b, const Emit& emit,
                                                                int64_t i0, int64_t i1, int64_t O, int64_t K) {
  const int64_t nv = K / 16;  // 512-bit vectors per row
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t* ai = a + i * K;
    int64_t o = 0;
    for (; o < O; o += kOutBlock) {
      const int64_t n = std::min<int64_t>(kOutBlock, O - o);
      __m512i total[kOutBlock], bytes[kOutBlock];
      for (int j = 0; j < kOutBlock; ++j) total[j] = bytes[j] = zero;
      for (int64_t v = 0; v < nv; ++v) {
        const __m512i x = _mm512_loadu_si512(ai + 16 * v);
        for (int64_t j = 0; j < n; ++j) {
          const __m512i y = _mm512_loadu_si512(b + (o + j) * K + 16 * v);
          bytes[j] = _mm512_add_epi8(bytes[j], popcount_bytes_avx512bw(_mm512_and_si512(x, y)));
        }
        if ((v & 15) == 15 || v == nv - 1) {
          for (int64_t j = 0; j < n; ++j) {
            total[j] = _mm512_add_epi64(total[j], _mm512_sad_epu8(bytes[j], zero));
            bytes[j] = zero;
          }
        }
      }
      for (int64_t j = 0; j < n; ++j) emit(i, o + j, _mm512_reduce_add_epi64(total[j]));
    }
  }
}

template <class Emit>
__attribute__((target("avx512f,avx512vpopcntdq"))) void rows_avx512vpopcntdq(const uint32_t* a, const uint32_t* b,
                                                                              const Emit& emit, int64_t i0,
                                                                              int64_t i1, int64_t O, int64_t K) {
  const int64_t nv = K / 16;
  for (int64_t i = i0; i < i1; ++i) {
    const uint32_t* ai = a + i * K;
    int64_t o = 0;
    for (; o < O; o += kOutBlock) {
      const int64_t n = std::min<int64_t>(kOutBlock, O - o);
      __m512i total[kOutBlock];
      for (int j = 0; j < kOutBlock; ++j) total[j] = _mm512_setzero_si512();
      for (int64_t v = 0; v < nv; ++v) {
        const __m512i x = _mm512_loadu_si512(ai + 16 * v);
        for (int64_t j = 0; j < n; ++j) {
          const __m512i y = _mm512_loadu_si512(b + (o + j) * K + 16 * v);
          total[j] = _mm512_add_epi64(total[j], _mm512_popcnt_epi64(_mm512_and_si512(x, y)));
        }
      }
      for (int64_t j = 0; j < n; ++j) emit(i, o + j, _mm512_reduce_add_epi64(total[j]));
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


// Rows [0, M) over up to `threads` threads on path `isa`, each sum handed to `emit`.
template <class Emit>
int run(const uint32_t* a, const uint32_t* b, const Emit& emit, int64_t M, int64_t O, int64_t K, int isa,
        int threads) {
  if (M < 0 || O < 0 || K < 0 || K % 16 != 0) return 2;
  if (!supports(isa)) return 1;
  using RowsFn = void (*)(const uint32_t*, const uint32_t*, const Emit&, int64_t, int64_t, int64_t, int64_t);
  static const RowsFn fns[] = {rows_scalar<Emit>, rows_avx2<Emit>, rows_avx512bw<Emit>, rows_avx512vpopcntdq<Emit>};
  const RowsFn fn = fns[isa];
  // Split rows evenly, but give each thread at least ~1M word-ANDs: a thread costs tens of microseconds.
  const int64_t work = M * O * std::max<int64_t>(K, 1);
  const int64_t useful = std::max<int64_t>(1, work / (1 << 20));
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(threads), useful, M}));
  if (n == 1) {
    fn(a, b, emit, 0, M, O, K);
    return 0;
  }
  std::vector<std::thread> pool;
  pool.reserve(n - 1);
  const int64_t per = (M + n - 1) / n;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t i0 = t * per, i1 = std::min(M, i0 + per);
    if (i0 >= i1) continue;
    try {
      pool.emplace_back(fn, a, b, std::cref(emit), i0, i1, O, K);
    } catch (...) {  // the host refused a thread (e.g. a process limit): this chunk runs here instead
      fn(a, b, emit, i0, i1, O, K);
    }
  }
  fn(a, b, emit, 0, std::min(M, per), O, K);
  for (auto& th : pool) th.join();
  return 0;
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

// 0 on success; 1: the CPU lacks `isa`; 2: bad arguments (K not a multiple of 16, negative sizes).
int dbgen_and_popcount_matmul(const uint32_t* a, const uint32_t* b, int64_t* out, int64_t M, int64_t O, int64_t K,
                              int isa, int threads) {
  return run(a, b, Product{out, O}, M, O, K, isa, threads);
}

// The same product through the binary layers' epilogue into out (M, O) float32; xs (M,) int64, cv (O, P) int32,
// scale and bias (O,) float32 or null. Return codes as above.
int dbgen_binary_dot_epilogue(const uint32_t* a, const uint32_t* b, int64_t M, int64_t O, int64_t K, const int64_t* xs,
                              const int32_t* cv, int64_t P, const float* scale, const float* bias, float* out, int isa,
                              int threads) {
  if (P < 1) return 2;
  return run(a, b, Epilogue{xs, cv, P, scale, bias, out, O}, M, O, K, isa, threads);
}

}  // extern "C"
