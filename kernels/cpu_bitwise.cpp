// Bitwise CPU kernels of dbgen: the AND-popcount product of packed sign words, the integer core of the fully
// binary (1/1) conv and linear layers (dbgen/kernels/packing.py derives the +-1 dot product from it exactly).
//
//   out[i, o] = sum_k popcount(a[i, k] & b[o, k])      a: (M, K) uint32 words, b: (O, K), out: (M, O) int64
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
#include <thread>
#include <vector>

namespace {

constexpr int kAbiVersion = 1;
constexpr int64_t kOutBlock = 4;  // output rows o sharing one load of the activation row

using RowsFn = void (*)(const uint32_t*, const uint32_t*, int64_t*, int64_t, int64_t, int64_t, int64_t);

// ------------------------------------------------------------------------------------------------ scalar
void rows_scalar(const uint32_t* a, const uint32_t* b, int64_t* out, int64_t i0, int64_t i1, int64_t O,
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
      out[i * O + o] = sum;
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

__attribute__((target("avx2"))) void rows_avx2(const uint32_t* a, const uint32_t* b, int64_t* out, int64_t i0,
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
      for (int j = 0; j < kOutBlock; ++j) out[i * O + o + j] = hsum_avx2(total[j]);
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
      out[i * O + o] = hsum_avx2(total);
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

__attribute__((target("avx512f,avx512bw"))) void rows_avx512bw(const uint32_t* a, const uint32_t* b, int64_t* out,
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
      for (int64_t j = 0; j < n; ++j) out[i * O + o + j] = _mm512_reduce_add_epi64(total[j]);
    }
  }
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void rows_avx512vpopcntdq(const uint32_t* a, const uint32_t* b,
                                                                              int64_t* out, int64_t i0, int64_t i1,
                                                                              int64_t O, int64_t K) {
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
      for (int64_t j = 0; j < n; ++j) out[i * O + o + j] = _mm512_reduce_add_epi64(total[j]);
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
  if (M < 0 || O < 0 || K < 0 || K % 16 != 0) return 2;
  if (!supports(isa)) return 1;
  static const RowsFn fns[] = {rows_scalar, rows_avx2, rows_avx512bw, rows_avx512vpopcntdq};
  const RowsFn fn = fns[isa];
  // Split rows evenly, but give each thread at least ~1M word-ANDs: a thread costs tens of microseconds.
  const int64_t work = M * O * std::max<int64_t>(K, 1);
  const int64_t useful = std::max<int64_t>(1, work / (1 << 20));
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(threads), useful, M}));
  if (n == 1) {
    fn(a, b, out, 0, M, O, K);
    return 0;
  }
  std::vector<std::thread> pool;
  pool.reserve(n - 1);
  const int64_t per = (M + n - 1) / n;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t i0 = t * per, i1 = std::min(M, i0 + per);
    if (i0 >= i1) continue;
    try {
      pool.emplace_back(fn, a, b, out, i0, i1, O, K);
    } catch (...) {  // the host refused a thread (e.g. a process limit): this chunk runs here instead
      fn(a, b, out, i0, i1, O, K);
    }
  }
  fn(a, b, out, 0, std::min(M, per), O, K);
  for (auto& th : pool) th.join();
  return 0;
}

}  // extern "C"
