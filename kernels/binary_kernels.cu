// Bitwise kernels for packed binary layers (dbgen.kernels). Built by dbgen/kernels/cuda.py with nvcc into a
// shared library and called through ctypes with raw device pointers and torch's current stream.
//
// Layouts (see dbgen/kernels/packing.py): activations are int32 words (N, H, W, Cw), channel c = bit c%32 of
// word c/32, 0 padding bits; weights are words (O, Kw), K ordered (tap, channel word), rows zero padded to a
// multiple of 8 words; bit 1 = +1. The +-1 dot product over valid positions is
//     dot = 4 * sum popc(w AND x) - 2 * X + Cv
// with X = +1 inputs in the receptive field and Cv = sum over valid taps of (C - 2 popc(w_tap)) (a table).
//
// Kernels:
//   pack_signs_kernel      flat bytes, same layout as dbgen.nn.pack_signs (warp ballot)
//   pack_act_kernel        float (any strides) -> activation words; pack_act_nhwc_kernel: channels-last input
//   bconv_kernel           fully binary implicit-GEMM conv / linear on mma.m16n8k256 .b1 AND.POPC tensor cores,
//                          epilogue: scale, bias, float/half/bf16 output or the packed signs of the output
//   pwconv_kernel          float activations x packed weights on bf16/fp16 mma.m16n8k16; the +-1 A fragments
//                          are made from weight bits in registers (fp32 input: 3-way bf16 split of x)
// Small batches split K over blockIdx.z ("serial split-K", one launch): each slice stores its partial tile in
// its own workspace slice, and the last slice to finish a tile (a per-tile counter that resets itself) adds
// the slices in z order (deterministic) and runs the epilogue.
//
// Every entry point returns a cudaError_t (0 = success) and launches on the given stream.
//
// With -DDBGEN_HOST_EMULATION (g++) the same source runs on CPU threads (host_emulation.h), for tests on
// machines without a GPU.

#include <cstdint>
#include <type_traits>

#ifdef DBGEN_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define DBGEN_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define DBGEN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint32_t name[]
#endif

#define DBGEN_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kThreads = 128;  // 4 warps, arranged 2 x 2 over a BM x BN output tile

enum DType { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum OutMode { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2, kOutPacked = 3 };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------------------------------- packing
// One thread per element; a warp ballot gathers 32 sign bits and lanes 0..3 write its 4 bytes.
template <typename T>
__global__ void pack_signs_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, long long n) {
  const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  bool bit = false;
  if (e < n) bit = to_f32(x[e]) >= 0.f;  // NaN -> 0, -0.0 -> 1, as torch's t >= 0
  const unsigned mask = __ballot_sync(0xffffffffu, bit);
  const int lane = threadIdx.x & 31;
  const long long byte = (e - lane) / 8 + lane;
  if (lane < 4 && byte < (n + 7) / 8) out[byte] = (uint8_t)(mask >> (8 * lane));
}

// NCHW (or any strides): one thread per output word (n, cw, y, x), x fastest so NCHW reads coalesce across
// the warp.
template <typename T>
__global__ void pack_act_kernel(const T* __restrict__ x, uint32_t* __restrict__ out, int N, int C, int H, int W,
                                int Cw, long long sN, long long sC, long long sH, long long sW) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long total = (long long)N * Cw * H * W;
  if (idx >= total) return;
  const int xx = (int)(idx % W);
  long long r = idx / W;
  const int yy = (int)(r % H);
  r /= H;
  const int cw = (int)(r % Cw);
  const int n = (int)(r / Cw);
  const T* p = x + n * sN + yy * sH + xx * sW;
  const int c0 = cw * 32;
  const int cnt = min(32, C - c0);
  uint32_t word = 0;
  for (int b = 0; b < cnt; ++b)
    if (to_f32(p[(long long)(c0 + b) * sC]) >= 0.f) word |= 1u << b;
  out[(((long long)n * H + yy) * W + xx) * Cw + cw] = word;
}

// Channels-last (sC == 1; also linear inputs): one warp per pixel. Lane l reads channel 32 q + l, so each of
// the pixel's words is one coalesced load of 32 consecutive channels; a ballot forms word q, lane q % 32 keeps
// it, and the pixel's words go out in one coalesced store per 32 words. (The NCHW kernel above would touch 32
// cache lines per warp load on this layout.)
template <typename T>
__global__ void pack_act_nhwc_kernel(const T* __restrict__ x, uint32_t* __restrict__ out, int N, int C, int H,
                                     int W, int Cw, long long sN, long long sH, long long sW) {
  const long long pix = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // uniform across the warp
  const int lane = threadIdx.x & 31;
  if (pix >= (long long)N * H * W) return;  // the whole warp
  const int xx = (int)(pix % W);
  const long long r = pix / W;
  const int yy = (int)(r % H), n = (int)(r / H);
  const T* p = x + n * sN + yy * sH + xx * sW;
  uint32_t* o = out + pix * Cw;
  for (int q0 = 0; q0 < Cw; q0 += 32) {
    uint32_t mine = 0;
    const int q_end = min(q0 + 32, Cw);
    for (int q = q0; q < q_end; ++q) {
      const int c = q * 32 + lane;
      const unsigned word = __ballot_sync(0xffffffffu, c < C && to_f32(p[c]) >= 0.f);  // NaN -> 0, as t >= 0
      if (lane == q - q0) mine = word;
    }
    if (q0 + lane < Cw) o[q0 + lane] = mine;
  }
}

// ------------------------------------------------------------------- cp.async (global -> shared, no registers)
// 16-byte (.cg: through L2 only) and 4-byte (.ca) copies. src_bytes < bytes zero-fills the rest; 0 reads nothing
// (padding and out-of-image pixels; src must still be a valid address). A copy is complete, for the issuing
// thread only, after the cp_async_wait<N> that covers its commit group; a __syncthreads then shows it to the
// block. The host emulation lands each copy at that wait, not at issue (host_emulation.h).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#ifdef DBGEN_HOST_EMULATION
  emu::cp_async(dst, src, 16, src_bytes);
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
#ifdef DBGEN_HOST_EMULATION
  emu::cp_async(dst, src, 4, src_bytes);
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef DBGEN_HOST_EMULATION
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef DBGEN_HOST_EMULATION
  emu::cp_async_wait(pending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

// ------------------------------------------------------------------------------- fully binary conv
constexpr int kStages = 4;  // bconv_kernel's cp.async ring: 3 K steps in flight while the mma runs on a 4th

// Word offset of half h (16 bytes) of row `row` of a shared-memory stage with 8-word rows (one K step of one
// channel or pixel). Rows 4..7 of every 8 swap their halves, so a fragment read (rows g = 0..7 of an aligned
// group of 8 at word t = 0..3 of one half) hits 32 distinct banks with no padding words.
__device__ __forceinline__ int swz(int row, int h) { return row * 8 + ((h ^ (row >> 2)) & 1) * 4; }

struct BconvParams {
  const uint32_t* act;   // (N, H, W, Cw)
  const uint32_t* wgt;   // (O, Kw)
  const int* cv;         // (O, Ho*Wo) valid-tap correction
  const int* wtot;       // (O,) its value for interior pixels
  const float* scale;    // (O,) or null
  const float* bias;     // (O,) or null
  void* out;             // (N, O, Ho, Wo) float/half/bf16, or packed words (N, Ho, Wo, Ow)
  int* ws;               // split-K workspace (ksplit, N, O, Ho*Wo) int32, or null
  int* counters;         // split-K per-tile counters (zero between launches)
  int out_mode;
  int N, C, H, W, Cw, O, KH, KW, SH, SW, PH, PW, Ho, Wo, Kw, T, Ow;
  int steps_per_split;   // 256-bit K steps per blockIdx.z
};

__device__ __forceinline__ void mma_b1_and(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef DBGEN_HOST_EMULATION
  emu::mma_b1_and(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ int popc4(uint4 v) { return __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w); }

// Serial split-K reduction of a thread's tile values v (index(mi, ni, e) = output index or -1 if outside).
// Returns true in the one block per tile that holds the full sums afterwards; the others are done.
template <typename Acc, int MT, int NT, typename IndexFn>
__device__ __forceinline__ bool split_k_reduce(Acc (&v)[MT][NT][4], Acc* ws, int* counters, long long total,
                                               IndexFn index) {
  __shared__ int is_last;
  const int z = blockIdx.z, nz = gridDim.z;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long i = index(mi, ni, e);
        if (i >= 0) ws[z * total + i] = v[mi][ni][e];
      }
  __threadfence();  // partials visible device-wide before this block is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    is_last = atomicAdd(counters + tile, 1) == nz - 1;
    if (is_last) counters[tile] = 0;  // every slice has arrived: reset for the next launch
  }
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long i = index(mi, ni, e);
        if (i < 0) continue;
        Acc sum = 0;
        for (int zz = 0; zz < nz; ++zz) sum += zz == z ? v[mi][ni][e] : __ldcg(ws + zz * total + i);
        v[mi][ni][e] = sum;
      }
  return true;
}

__device__ __forceinline__ void store_out(void* out, int mode, long long i, float y) {
  if (mode == kOutF32) static_cast<float*>(out)[i] = y;
  else if (mode == kOutF16) static_cast<__half*>(out)[i] = __float2half_rn(y);
  else static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(y);
}

// Elements i and i + 1 (i even, so the store is aligned) in one store.
__device__ __forceinline__ void store_pair(void* out, int mode, long long i, float y0, float y1) {
  if (mode == kOutF32) {
    *reinterpret_cast<float2*>(static_cast<float*>(out) + i) = make_float2(y0, y1);
  } else if (mode == kOutF16) {
    *reinterpret_cast<__half2*>(static_cast<__half*>(out) + i) = __halves2half2(__float2half_rn(y0), __float2half_rn(y1));
  } else {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + i) =
        __halves2bfloat162(__float2bfloat16_rn(y0), __float2bfloat16_rn(y1));
  }
}

// Per output column (pixel) of the current tile, computed once per tile for the epilogue.
struct ColInfo {
  long long off;  // n * O * Ho*Wo + sp: output index of channel 0, or -1 outside the output
  int sp;         // y * Wo + x
  int interior;   // every tap inside the input: the valid-tap correction is the per-channel total
};

// Block: BM output channels x BN output pixels (pixels flattened over N*Ho*Wo); WARPS_M x WARPS_N warps, each
// (BM/WARPS_M) x (BN/WARPS_N). K loop: 8 words (256 bits) per step; the activations (and streamed weights) of
// each step go global -> shared by cp.async into a kStages ring, kStages - 1 steps ahead of the tensor cores.
// ALIGNED: Cw % 8 == 0, so a step never crosses a tap and a pixel's half step is one 16-byte copy; otherwise
// each word is its own 4-byte copy (its own tap).
// STATIONARY: the block's BM weight rows (all of K) stay in (dynamic) shared memory in mma fragment order and
// the block walks over pixel tiles (persistent grid): weights are read once per block and, with BM >= O,
// activations once per pixel tile. Otherwise the weights stream through the ring with the activations (one
// pixel tile per block, optional split-K over blockIdx.z).
// STATIONARY tiles ask for 2 resident blocks per SM (<= 128 registers at 256 threads; their weight rows fit twice
// in shared memory for K up to 5x5x256 on tile 2, 3x3x256 on tile 3): one block's load and epilogue latency hides
// behind the other's tensor-core work. The persistent grid is sized from the occupancy query.
// KSTEPS > 0 (STATIONARY, K = KSTEPS steps exactly): each warp's A fragments for all of K stay in registers
// (KSTEPS x MT x 4 words), the K loop is unrolled, shared memory serves only B; one block per SM (more registers).
template <int BM, int BN, int WARPS_M, int WARPS_N, bool ALIGNED, bool STATIONARY, int KSTEPS = 0>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N, STATIONARY && KSTEPS == 0 ? 2 : 1)
    bconv_kernel(const BconvParams p) {
  constexpr int NTH = 32 * WARPS_M * WARPS_N;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MT = WM / 16, NT = WN / 8;
  constexpr int MB = BM / 16;  // 16-row fragment blocks of the stationary weights
  constexpr int A_VECS = BM * 2, B_VECS = BN * 2;  // 16-byte halves of rows per step
  constexpr int A_IT = STATIONARY ? 0 : (A_VECS + NTH - 1) / NTH;
  constexpr int B_IT = (B_VECS + NTH - 1) / NTH;
  static_assert(WM % 16 == 0 && WN % 8 == 0 && BM % 32 == 0, "tile");
  static_assert(KSTEPS == 0 || STATIONARY, "A fragments in registers come from the stationary weights");

  __shared__ __align__(16) uint32_t As[STATIONARY ? 1 : kStages][STATIONARY ? 4 : BM * 8];
  __shared__ __align__(16) uint32_t Bs[kStages][BN * 8];
  __shared__ int Xs[BN];
  __shared__ uint32_t Pw[BN * (BM / 32)];
  __shared__ ColInfo cols[BN];
  // STATIONARY: Kw/8 steps x MB row blocks x 32 lanes x 4 words, a lane's A fragment of a step and row block
  // (rows g, g + 8 x words t, t + 4) as one 16-byte vector: one conflict-free 128-bit load per fragment.
  DBGEN_DYNAMIC_SMEM(Aw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int bm0 = blockIdx.y * BM;
  const int HoWo = p.Ho * p.Wo, NP = p.N * HoWo;
  const int nsteps = KSTEPS > 0 ? KSTEPS : p.Kw / 8;  // KSTEPS: the launcher checks Kw == 8 KSTEPS
  const int s_begin = STATIONARY ? 0 : blockIdx.z * p.steps_per_split;
  const int s_end = STATIONARY ? nsteps : min(s_begin + p.steps_per_split, nsteps);
  if (s_begin >= s_end) return;  // uniform across the block

  if constexpr (STATIONARY) {
    const int vecs = p.Kw / 4;  // per row; vector v = words 4v..4v+3 = half v & 1 of step v / 2
    for (int i = tid; i < BM * vecs; i += NTH) {
      const int row = i / vecs, v = i - row * vecs;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (bm0 + row < p.O) val = __ldg(reinterpret_cast<const uint4*>(p.wgt + (long long)(bm0 + row) * p.Kw + v * 4));
      // word t of the half goes to lane (row % 8) * 4 + t, element (row % 16) / 8 + 2 * half
      const int r = row & 15;
      uint32_t* f = &Aw[(((v >> 1) * MB + (row >> 4)) * 32 + (r & 7) * 4) * 4 + (r >> 3) + 2 * (v & 1)];
      f[0] = val.x;
      f[4] = val.y;
      f[8] = val.z;
      f[12] = val.w;
    }
  }
  uint4 a_all[KSTEPS > 0 ? KSTEPS : 1][MT];  // KSTEPS: this lane's A fragments of every step
  if constexpr (KSTEPS > 0) {
    __syncthreads();  // Aw is written
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
        a_all[s][mi] = *reinterpret_cast<const uint4*>(&Aw[((s * MB + wm * MT + mi) * 32 + lane) * 4]);
  }

  for (int bn0 = blockIdx.x * BN; bn0 < NP; bn0 += gridDim.x * BN) {
    __syncthreads();  // the previous tile is done with Pw, cols, Xs and the ring (and Aw is written)
    for (int i = tid; i < BN * (BM / 32); i += NTH) Pw[i] = 0u;
    for (int j = tid; j < BN; j += NTH) {
      const int pix = bn0 + j;
      ColInfo c{-1, 0, 0};
      if (pix < NP) {
        const int n = pix / HoWo, sp = pix - n * HoWo;
        const int oy = sp / p.Wo, ox = sp - oy * p.Wo;
        const int iy = oy * p.SH - p.PH, ix = ox * p.SW - p.PW;
        c.off = (long long)n * p.O * HoWo + sp;
        c.sp = sp;
        c.interior = iy >= 0 && ix >= 0 && iy + p.KH <= p.H && ix + p.KW <= p.W;
      }
      cols[j] = c;
    }

    // Per B slot: the output pixel's top-left input corner and image base (invalid pixel: corner far outside).
    int b_iy0[B_IT], b_ix0[B_IT];
    long long b_base[B_IT];
#pragma unroll
    for (int r = 0; r < B_IT; ++r) {
      const int idx = tid + r * NTH;
      const int pix = bn0 + (idx >> 1);
      b_iy0[r] = -(1 << 29);
      b_ix0[r] = -(1 << 29);
      b_base[r] = 0;
      if (idx < B_VECS && pix < NP) {
        const int n = pix / HoWo, sp = pix - n * HoWo;
        const int oy = sp / p.Wo, ox = sp - oy * p.Wo;
        b_iy0[r] = oy * p.SH - p.PH;
        b_ix0[r] = ox * p.SW - p.PW;
        b_base[r] = (long long)n * p.H * p.W * p.Cw;
      }
    }

    int xacc[B_IT];
#pragma unroll
    for (int r = 0; r < B_IT; ++r) xacc[r] = 0;

    // ALIGNED: the tap and channel word of the next step to issue, advanced without divisions.
    int it_cw = 0, it_ky = 0, it_kx = 0;
    if (ALIGNED) {
      const int k0 = s_begin * 8, tap = k0 / p.Cw;
      it_cw = k0 - tap * p.Cw;
      it_ky = tap / p.KW;
      it_kx = tap - it_ky * p.KW;
    }

    // The copies of step s (called for consecutive steps) into ring stage `stage`; zero-filled outside the
    // weight rows, the image and the taps, so padding words are 0 in shared memory as in the packed layout.
    auto issue = [&](int s, int stage) {
      const int k0 = s * 8;
#pragma unroll
      for (int r = 0; r < A_IT; ++r) {
        const int idx = tid + r * NTH;
        const int o = bm0 + (idx >> 1);
        if (idx >= A_VECS) continue;
        const bool valid = o < p.O;
        cp_async16(&As[stage][swz(idx >> 1, idx & 1)], valid ? p.wgt + (long long)o * p.Kw + k0 + (idx & 1) * 4 : p.wgt,
                   valid ? 16 : 0);
      }
#pragma unroll
      for (int r = 0; r < B_IT; ++r) {
        const int idx = tid + r * NTH;
        const int h = idx & 1;
        if (idx >= B_VECS) continue;
        uint32_t* dst = &Bs[stage][swz(idx >> 1, h)];
        if (ALIGNED) {
          const int iy = b_iy0[r] + it_ky, ix = b_ix0[r] + it_kx;
          const bool valid = it_ky < p.KH && (unsigned)iy < (unsigned)p.H && (unsigned)ix < (unsigned)p.W;
          cp_async16(dst, valid ? p.act + b_base[r] + ((long long)iy * p.W + ix) * p.Cw + it_cw + h * 4 : p.act,
                     valid ? 16 : 0);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int k = k0 + h * 4 + q;
            const int tap = k / p.Cw;
            const uint32_t* src = nullptr;
            if (tap < p.T) {
              const int cw = k - tap * p.Cw;
              const int ky = tap / p.KW, kx = tap - ky * p.KW;
              const int iy = b_iy0[r] + ky, ix = b_ix0[r] + kx;
              if ((unsigned)iy < (unsigned)p.H && (unsigned)ix < (unsigned)p.W)
                src = p.act + b_base[r] + ((long long)iy * p.W + ix) * p.Cw + cw;
            }
            cp_async4(dst + q, src ? src : p.act, src ? 4 : 0);
          }
        }
      }
      if (ALIGNED) {  // next step: 8 words further along the tap's channel words, then the next tap
        it_cw += 8;
        if (it_cw >= p.Cw) {
          it_cw = 0;
          if (++it_kx == p.KW) {
            it_kx = 0;
            ++it_ky;
          }
        }
      }
    };

    int acc[MT][NT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0;

    // Step s_begin + i lives in stage i % kStages. One commit group per step, an empty one past the end, so
    // "all but the newest kStages - 2 groups" is always "up to the current step".
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
      if (s_begin + i < s_end) issue(s_begin + i, i);
      cp_async_commit();
    }
    int stage = 0;
#pragma unroll(KSTEPS > 0 ? KSTEPS : 1)  // KSTEPS: fully unrolled, so a_all is indexed at compile time
    for (int s = s_begin; s < s_end; ++s) {
      cp_async_wait<kStages - 2>();  // this thread's copies of step s have landed ...
      __syncthreads();  // ... and every thread's; and every thread is done with step s - 1's stage, refilled here
      if (s + kStages - 1 < s_end) issue(s + kStages - 1, stage == 0 ? kStages - 1 : stage - 1);
      cp_async_commit();
#pragma unroll
      for (int r = 0; r < B_IT; ++r) {  // +1 inputs of the pixel's receptive field (padding words are 0)
        const int idx = tid + r * NTH;
        if (idx < B_VECS) xacc[r] += popc4(*reinterpret_cast<const uint4*>(&Bs[stage][swz(idx >> 1, idx & 1)]));
      }

      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        if constexpr (STATIONARY) {
          uint4 a;
          if constexpr (KSTEPS > 0) a = a_all[s][mi];
          else a = *reinterpret_cast<const uint4*>(&Aw[((s * MB + wm * MT + mi) * 32 + lane) * 4]);
          af[mi][0] = a.x;
          af[mi][1] = a.y;
          af[mi][2] = a.z;
          af[mi][3] = a.w;
        } else {
          const int row = wm * WM + mi * 16 + g;
          af[mi][0] = As[stage][swz(row, 0) + t];
          af[mi][1] = As[stage][swz(row + 8, 0) + t];
          af[mi][2] = As[stage][swz(row, 1) + t];
          af[mi][3] = As[stage][swz(row + 8, 1) + t];
        }
      }
#pragma unroll
      for (int ni = 0; ni < NT; ++ni) {
        const int row = wn * WN + ni * 8 + g;
        bf[ni][0] = Bs[stage][swz(row, 0) + t];
        bf[ni][1] = Bs[stage][swz(row, 1) + t];
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) mma_b1_and(acc[mi][ni], af[mi], bf[ni]);
      stage = stage == kStages - 1 ? 0 : stage + 1;
    }

    // X per pixel: the two threads of a pixel are adjacent lanes.
#pragma unroll
    for (int r = 0; r < B_IT; ++r) {
      const int idx = tid + r * NTH;
      const int x = xacc[r] + __shfl_xor_sync(0xffffffffu, xacc[r], 1);
      if (idx < B_VECS && (idx & 1) == 0) Xs[idx >> 1] = x;
    }
    __syncthreads();

    // acc <- 4 P - 2 X: the dot product without the valid-tap correction (additive over K slices).
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 4 * acc[mi][ni][e] - 2 * Xs[wn * WN + ni * 8 + 2 * t + (e & 1)];
    if (!STATIONARY && p.ws) {
      auto index = [&](int mi, int ni, int e) -> long long {
        const int o = bm0 + wm * WM + mi * 16 + g + (e >> 1) * 8;
        const long long off = cols[wn * WN + ni * 8 + 2 * t + (e & 1)].off;
        return o >= p.O || off < 0 ? -1 : off + (long long)o * HoWo;
      };
      if (!split_k_reduce(acc, p.ws, p.counters, (long long)NP * p.O, index)) return;  // single-tile grid
    }

    // Epilogue: per row (channel) scale, bias and interior correction; per column the precomputed offsets.
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int row = wm * WM + mi * 16 + g + hr * 8;
        const int o = bm0 + row;
        if (o >= p.O) continue;
        const int wtot = __ldg(p.wtot + o);
        const float sc = p.scale ? __ldg(p.scale + o) : 0.f, bi = p.bias ? __ldg(p.bias + o) : 0.f;
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
          const int c0 = wn * WN + ni * 8 + 2 * t;
          float y[2];
          long long idx[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const ColInfo c = cols[c0 + e];
            idx[e] = c.off < 0 ? -1 : c.off + (long long)o * HoWo;
            const int corr = c.interior ? wtot : (c.off < 0 ? 0 : __ldg(p.cv + (long long)o * HoWo + c.sp));
            float v = (float)(acc[mi][ni][hr * 2 + e] + corr);
            if (p.scale) v = __fmul_rn(v, sc);
            if (p.bias) v = __fadd_rn(v, bi);
            y[e] = v;
          }
          if (p.out_mode == kOutPacked) {
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (idx[e] >= 0 && y[e] >= 0.f) atomicOr(&Pw[(c0 + e) * (BM / 32) + row / 32], 1u << (row & 31));
          } else if (idx[0] >= 0 && idx[1] == idx[0] + 1 && (idx[0] & 1) == 0) {
            store_pair(p.out, p.out_mode, idx[0], y[0], y[1]);  // two adjacent pixels, one aligned store
          } else {
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (idx[e] >= 0) store_out(p.out, p.out_mode, idx[e], y[e]);
          }
        }
      }

    if (p.out_mode == kOutPacked) {
      __syncthreads();
      for (int i = tid; i < BN * (BM / 32); i += NTH) {
        const int col = i / (BM / 32), wq = i - col * (BM / 32);
        const int pix = bn0 + col, word = bm0 / 32 + wq;
        if (pix < NP && word < p.Ow) static_cast<uint32_t*>(p.out)[(long long)pix * p.Ow + word] = Pw[i];
      }
    }
  }
}

// ------------------------------------------------------------------- packed weights x float activations
struct PwconvParams {
  const void* x;          // (N, H, W, C) channels-last, dtype T
  const uint32_t* wT;     // (Kw, O): word k of every output channel, K ordered (tap, channel word)
  const float* scale;     // (O,) or null
  const float* bias;      // (O,) or null
  void* out;              // (N, O, Ho, Wo) dtype T
  float* ws;              // split-K workspace (ksplit, N, O, Ho*Wo) fp32, or null
  int* counters;          // split-K per-tile counters (zero between launches)
  int N, C, H, W, Cw, O, KH, KW, SH, SW, PH, PW, Ho, Wo, Kw;  // Kw = T * Cw
  int chunks_per_split;   // KC-word chunks per blockIdx.z
};

template <typename T> struct MmaType;
template <> struct MmaType<__half> {
  static constexpr uint32_t kOnePair = 0x3C003C00u;  // (1.0h, 1.0h)
  static constexpr int kSplit = 1;
};
template <> struct MmaType<__nv_bfloat16> {
  static constexpr uint32_t kOnePair = 0x3F803F80u;  // (1.0bf, 1.0bf)
  static constexpr int kSplit = 1;
};
template <> struct MmaType<float> {  // fp32 input: x = hi + mid + lo in bf16, three exact +-1 products
  static constexpr int kSplit = 3;
};

// Two weight bits (at `shift`, `shift+1`) -> a pair of +-1.0 in the mma input type (bit 0 sets the sign).
template <typename T>
__device__ __forceinline__ uint32_t bits_to_pm1(uint32_t w, int shift) {
  const uint32_t s = ~(w >> shift);
  return MmaType<T>::kOnePair | ((s & 1u) << 15) | ((s & 2u) << 30);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef DBGEN_HOST_EMULATION
  emu::mma_16816<T>(c, a, b0, b1);
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low 16 bits)
  return *reinterpret_cast<uint32_t*>(&v);
}

// 8 consecutive channels of one input pixel as KS 32-bit words per split plane (zero outside the image or C).
template <typename T, bool VEC>
struct Vec8 {
  static constexpr int kWords = MmaType<T>::kSplit * 4;
  uint32_t w[kWords];

  __device__ __forceinline__ void load(const T* __restrict__ px, int c, int C, bool valid) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
    if (!valid || c >= C) return;
    if constexpr (std::is_same<T, float>::value) {
      float f[8];
      if (VEC) {
        const float4 u = __ldg(reinterpret_cast<const float4*>(px + c));
        const float4 v = __ldg(reinterpret_cast<const float4*>(px + c + 4));
        f[0] = u.x; f[1] = u.y; f[2] = u.z; f[3] = u.w; f[4] = v.x; f[5] = v.y; f[6] = v.z; f[7] = v.w;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = (c + e < C) ? __ldg(px + c + e) : 0.f;
      }
      // Exact split: hi = bf16(f), mid = bf16(f - hi), lo = bf16(f - hi - mid); f - hi and its remainder are
      // exact in fp32, so hi + mid + lo carries 24 mantissa bits.
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        float hi[2], mid[2], lo[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          hi[q] = __bfloat162float(__float2bfloat16_rn(f[e + q]));
          const float r = f[e + q] - hi[q];
          mid[q] = __bfloat162float(__float2bfloat16_rn(r));
          lo[q] = r - mid[q];
        }
        w[e / 2] = pack_bf16x2(hi[0], hi[1]);
        w[4 + e / 2] = pack_bf16x2(mid[0], mid[1]);
        w[8 + e / 2] = pack_bf16x2(lo[0], lo[1]);
      }
    } else {
      if (VEC) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(px + c));
        w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
      } else {
        uint16_t h[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          h[e] = (c + e < C) ? __ldg(reinterpret_cast<const unsigned short*>(px) + c + e) : (uint16_t)0;
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = (uint32_t)h[2 * e] | ((uint32_t)h[2 * e + 1] << 16);
      }
    }
  }
};

// Block: BM output channels x BN output pixels; K in chunks of KC weight words (KC * 32 input channels of
// whole taps). A fragments come straight from the weight words (bits -> +-1 pairs in registers); B (the
// activations) goes through double-buffered shared memory, row stride KC*16 + 4 words (conflict-free).
template <typename T, int BM, int BN, int KC, bool VEC>
__global__ void __launch_bounds__(kThreads) pwconv_kernel(const PwconvParams p) {
  using MT_ = MmaType<T>;
  using MmaIn = typename std::conditional<std::is_same<T, __half>::value, __half, __nv_bfloat16>::type;
  constexpr int NS = MT_::kSplit;
  constexpr int WM = BM / 2, WN = BN / 2, MT = WM / 16, NT = WN / 8;
  constexpr int RSB = KC * 16 + 4;
  constexpr int B_SLOTS = BN * KC * 4;  // 8-channel vectors per chunk
  constexpr int B_IT = (B_SLOTS + kThreads - 1) / kThreads;
  constexpr int A_WORDS = BM * KC;
  constexpr int A_IT = (A_WORDS + kThreads - 1) / kThreads;
  static_assert(BM % 32 == 0 && BN % 16 == 0, "tile");

  __shared__ __align__(16) uint32_t Bs[2][NS][BN * RSB];
  __shared__ uint32_t As[2][KC * BM];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 1, wn = warp & 1;
  const int bm0 = blockIdx.y * BM, bn0 = blockIdx.x * BN;
  const int HoWo = p.Ho * p.Wo, NP = p.N * HoWo;
  const int nchunks = (p.Kw + KC - 1) / KC;
  const int c_begin = blockIdx.z * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, nchunks);
  if (c_begin >= c_end) return;
  const T* __restrict__ x = static_cast<const T*>(p.x);

  int b_iy0[B_IT], b_ix0[B_IT];
  long long b_base[B_IT];
#pragma unroll
  for (int r = 0; r < B_IT; ++r) {
    const int idx = tid + r * kThreads;
    const int pix = bn0 + idx / (KC * 4);
    b_iy0[r] = -(1 << 29);
    b_ix0[r] = -(1 << 29);
    b_base[r] = 0;
    if (idx < B_SLOTS && pix < NP) {
      const int n = pix / HoWo, sp = pix - n * HoWo;
      const int oy = sp / p.Wo, ox = sp - oy * p.Wo;
      b_iy0[r] = oy * p.SH - p.PH;
      b_ix0[r] = ox * p.SW - p.PW;
      b_base[r] = (long long)n * p.H * p.W * p.C;
    }
  }

  Vec8<T, VEC> b_reg[B_IT];
  uint32_t a_reg[A_IT];

  auto load = [&](int chunk) {
    const int kw0 = chunk * KC;
#pragma unroll
    for (int r = 0; r < A_IT; ++r) {
      const int idx = tid + r * kThreads;
      const int q = idx / BM, row = idx - q * BM;
      a_reg[r] = 0u;
      if (idx < A_WORDS && kw0 + q < p.Kw && bm0 + row < p.O)
        a_reg[r] = __ldg(p.wT + (long long)(kw0 + q) * p.O + bm0 + row);
    }
#pragma unroll
    for (int r = 0; r < B_IT; ++r) {
      const int idx = tid + r * kThreads;
      const int rem = idx % (KC * 4);
      const int q = rem >> 2, v = rem & 3;
      const int kw = kw0 + q;
      bool valid = idx < B_SLOTS && kw < p.Kw;
      const int tap = kw / p.Cw;
      const int c = (kw - tap * p.Cw) * 32 + v * 8;
      const int ky = tap / p.KW, kx = tap - ky * p.KW;
      const int iy = b_iy0[r] + ky, ix = b_ix0[r] + kx;
      valid = valid && (unsigned)iy < (unsigned)p.H && (unsigned)ix < (unsigned)p.W;
      const T* px = x + b_base[r] + ((long long)iy * p.W + ix) * p.C;
      b_reg[r].load(px, c, p.C, valid);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  load(c_begin);
  for (int chunk = c_begin; chunk < c_end; ++chunk) {
    const int buf = (chunk - c_begin) & 1;
#pragma unroll
    for (int r = 0; r < A_IT; ++r) {
      const int idx = tid + r * kThreads;
      if (idx < A_WORDS) As[buf][idx] = a_reg[r];
    }
#pragma unroll
    for (int r = 0; r < B_IT; ++r) {
      const int idx = tid + r * kThreads;
      if (idx < B_SLOTS) {
        const int j = idx / (KC * 4), rem = idx % (KC * 4);
        const int off = j * RSB + (rem >> 2) * 16 + (rem & 3) * 4;
#pragma unroll
        for (int s = 0; s < NS; ++s)
          *reinterpret_cast<uint4*>(&Bs[buf][s][off]) =
              make_uint4(b_reg[r].w[4 * s], b_reg[r].w[4 * s + 1], b_reg[r].w[4 * s + 2], b_reg[r].w[4 * s + 3]);
      }
    }
    __syncthreads();
    if (chunk + 1 < c_end) load(chunk + 1);

#pragma unroll
    for (int q = 0; q < KC; ++q) {
      uint32_t wlo[MT], whi[MT];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        wlo[mi] = As[buf][q * BM + wm * WM + mi * 16 + g];
        whi[mi] = As[buf][q * BM + wm * WM + mi * 16 + g + 8];
      }
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        uint32_t af[MT][4];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          af[mi][0] = bits_to_pm1<MmaIn>(wlo[mi], ks * 16 + 2 * t);
          af[mi][1] = bits_to_pm1<MmaIn>(whi[mi], ks * 16 + 2 * t);
          af[mi][2] = bits_to_pm1<MmaIn>(wlo[mi], ks * 16 + 2 * t + 8);
          af[mi][3] = bits_to_pm1<MmaIn>(whi[mi], ks * 16 + 2 * t + 8);
        }
#pragma unroll
        for (int s = 0; s < NS; ++s)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni) {
            const uint32_t* b = &Bs[buf][s][(wn * WN + ni * 8 + g) * RSB + q * 16 + ks * 8 + t];
            const uint32_t b0 = b[0], b1 = b[4];
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) mma_16816<MmaIn>(acc[mi][ni], af[mi], b0, b1);
          }
      }
    }
  }

  if (p.ws) {
    auto index = [&](int mi, int ni, int e) -> long long {
      const int o = bm0 + wm * WM + mi * 16 + g + (e >> 1) * 8, pix = bn0 + wn * WN + ni * 8 + 2 * t + (e & 1);
      if (o >= p.O || pix >= NP) return -1;
      const int n = pix / HoWo;
      return ((long long)n * p.O + o) * HoWo + (pix - n * HoWo);
    };
    if (!split_k_reduce(acc, p.ws, p.counters, (long long)NP * p.O, index)) return;
  }

  T* __restrict__ out = static_cast<T*>(p.out);
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int o = bm0 + wm * WM + mi * 16 + g + (e >> 1) * 8;
        const int pix = bn0 + wn * WN + ni * 8 + 2 * t + (e & 1);
        if (o >= p.O || pix >= NP) continue;
        const int n = pix / HoWo, sp = pix - n * HoWo;
        float y = acc[mi][ni][e];
        if (p.scale) y = __fmul_rn(y, __ldg(p.scale + o));
        if (p.bias) y = __fadd_rn(y, __ldg(p.bias + o));
        out[((long long)n * p.O + o) * HoWo + sp] = from_f32<T>(y);
      }
}

// ------------------------------------------------------------------------------------------ launchers
inline unsigned blocks_for(long long n, int threads) { return (unsigned)((n + threads - 1) / threads); }

template <int BM, int BN, int WARPS_M, int WARPS_N, bool STATIONARY, int KSTEPS = 0>
cudaError_t launch_bconv(const BconvParams& p, int ksplit, int device, cudaStream_t st) {
  constexpr int NTH = 32 * WARPS_M * WARPS_N;
  const int NP = p.N * p.Ho * p.Wo;
  const int tiles_n = (NP + BN - 1) / BN, tiles_m = (p.O + BM - 1) / BM;
  const auto kernel = p.Cw % 8 == 0 ? bconv_kernel<BM, BN, WARPS_M, WARPS_N, true, STATIONARY, KSTEPS>
                                    : bconv_kernel<BM, BN, WARPS_M, WARPS_N, false, STATIONARY, KSTEPS>;
  dim3 grid(tiles_n, tiles_m, STATIONARY ? 1 : ksplit);
  size_t dyn = 0;
  if (STATIONARY) {
    dyn = (size_t)BM * p.Kw * sizeof(uint32_t);
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    int optin = 0, sms = 0, resident = 0;
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (dyn + attr.sharedSizeBytes > (size_t)optin) return cudaErrorInvalidConfiguration;  // stream weights instead
    if (dyn > 48 * 1024) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dyn);
      if (err != cudaSuccess) return err;
    }
    // Persistent grid: as many blocks as fit at once (registers and shared memory), at most 2 per SM.
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, NTH, dyn);
    if (err != cudaSuccess) return err;
    grid.x = max(1, min(tiles_n, sms * max(1, min(2, resident)) / tiles_m));
  }
  DBGEN_LAUNCH(kernel, grid, NTH, dyn, st, p);
  return cudaGetLastError();
}

template <typename T, int BM, int BN, int KC>
void launch_pwconv_t(const PwconvParams& p, bool vec, int ksplit, cudaStream_t st) {
  const int NP = p.N * p.Ho * p.Wo;
  const dim3 grid((NP + BN - 1) / BN, (p.O + BM - 1) / BM, ksplit);
  const auto kernel = vec ? pwconv_kernel<T, BM, BN, KC, true> : pwconv_kernel<T, BM, BN, KC, false>;
  DBGEN_LAUNCH(kernel, grid, kThreads, 0, st, p);
}

template <typename T, int KC>
void launch_pwconv(const PwconvParams& p, bool vec, int tile, int ksplit, cudaStream_t st) {
  if (tile == 0) launch_pwconv_t<T, 64, 64, KC>(p, vec, ksplit, st);
  else launch_pwconv_t<T, 32, 32, KC>(p, vec, ksplit, st);
}

}  // namespace

// ------------------------------------------------------------------------------------------- C API
DBGEN_API int dbgen_abi_version() { return 3; }

DBGEN_API const char* dbgen_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

DBGEN_API int dbgen_pack_signs(const void* x, int dtype, void* out, long long n, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  if (n <= 0) return cudaSuccess;
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(n, 256);
  auto* o = static_cast<uint8_t*>(out);
  if (dtype == kF32) DBGEN_LAUNCH(pack_signs_kernel<float>, blocks, 256, 0, st, static_cast<const float*>(x), o, n);
  else if (dtype == kF16) DBGEN_LAUNCH(pack_signs_kernel<__half>, blocks, 256, 0, st, static_cast<const __half*>(x), o, n);
  else if (dtype == kBF16)
    DBGEN_LAUNCH(pack_signs_kernel<__nv_bfloat16>, blocks, 256, 0, st, static_cast<const __nv_bfloat16*>(x), o, n);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

DBGEN_API int dbgen_pack_activations(const void* x, int dtype, void* out, int N, int C, int H, int W,
                                     long long sN, long long sC, long long sH, long long sW, int device,
                                     void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  const int Cw = (C + 31) / 32;
  const long long total = (long long)N * Cw * H * W;
  if (total <= 0) return cudaSuccess;
  auto st = static_cast<cudaStream_t>(stream);
  auto* o = static_cast<uint32_t*>(out);
  if (sC == 1) {  // channels-last: a warp per pixel
    const unsigned wb = blocks_for((long long)N * H * W * 32, 256);
    if (dtype == kF32)
      DBGEN_LAUNCH(pack_act_nhwc_kernel<float>, wb, 256, 0, st, static_cast<const float*>(x), o, N, C, H, W, Cw, sN,
                   sH, sW);
    else if (dtype == kF16)
      DBGEN_LAUNCH(pack_act_nhwc_kernel<__half>, wb, 256, 0, st, static_cast<const __half*>(x), o, N, C, H, W, Cw, sN,
                   sH, sW);
    else if (dtype == kBF16)
      DBGEN_LAUNCH(pack_act_nhwc_kernel<__nv_bfloat16>, wb, 256, 0, st, static_cast<const __nv_bfloat16*>(x), o, N, C,
                   H, W, Cw, sN, sH, sW);
    else return cudaErrorInvalidValue;
    return cudaGetLastError();
  }
  const unsigned blocks = blocks_for(total, 256);
  if (dtype == kF32)
    DBGEN_LAUNCH(pack_act_kernel<float>, blocks, 256, 0, st, static_cast<const float*>(x), o, N, C, H, W, Cw, sN, sC, sH,
                 sW);
  else if (dtype == kF16)
    DBGEN_LAUNCH(pack_act_kernel<__half>, blocks, 256, 0, st, static_cast<const __half*>(x), o, N, C, H, W, Cw, sN, sC,
                 sH, sW);
  else if (dtype == kBF16)
    DBGEN_LAUNCH(pack_act_kernel<__nv_bfloat16>, blocks, 256, 0, st, static_cast<const __nv_bfloat16*>(x), o, N, C, H,
                 W, Cw, sN, sC, sH, sW);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

// out_mode: 0 fp32, 1 fp16, 2 bf16 (N, O, Ho, Wo); 3 packed sign words (N, Ho, Wo, ceil(O/32)).
// tile (channels x pixels): 0 = 64x64, 1 = 32x32 (streamed weights, optional split-K); 2 = 128x64, 3 = 256x32
// (weights stationary in shared memory, persistent grid, no split-K; falls back to 0 where the weights do
// not fit); 4 = tile 3 with the A fragments in registers for K = 9 steps (else tile 3; never chosen by
// dbgen.kernels, only asked for by the benchmark sweep). ksplit > 1 needs ws, int32 (ksplit, N, O, Ho*Wo) (no
// initialization needed), and counters, int32 with one zero per output tile, left zero again afterwards.
DBGEN_API int dbgen_bconv(const void* act, const void* wgt, const int* cv, const int* wtot, const float* scale,
                          const float* bias, void* out, int out_mode, int* ws, int* counters, int N, int C, int H,
                          int W, int O,
                          int KH, int KW, int SH, int SW, int PH, int PW, int Kw, int tile, int ksplit, int device,
                          void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  BconvParams p;
  p.act = static_cast<const uint32_t*>(act);
  p.wgt = static_cast<const uint32_t*>(wgt);
  p.cv = cv;
  p.wtot = wtot;
  p.scale = scale;
  p.bias = bias;
  p.out = out;
  p.out_mode = out_mode;
  p.N = N; p.C = C; p.H = H; p.W = W; p.Cw = (C + 31) / 32; p.O = O;
  p.KH = KH; p.KW = KW; p.SH = SH; p.SW = SW; p.PH = PH; p.PW = PW;
  p.Ho = (H + 2 * PH - KH) / SH + 1;
  p.Wo = (W + 2 * PW - KW) / SW + 1;
  p.Kw = Kw;
  p.T = KH * KW;
  p.Ow = (O + 31) / 32;
  if (out_mode < 0 || out_mode > 3 || Kw % 8 != 0 || Kw < p.T * p.Cw || ksplit < 1 ||
      (ksplit > 1 && (!ws || !counters)))
    return cudaErrorInvalidValue;
  const int nsteps = Kw / 8;
  p.steps_per_split = (nsteps + ksplit - 1) / ksplit;
  ksplit = (nsteps + p.steps_per_split - 1) / p.steps_per_split;  // no empty slices
  if (tile >= 2) ksplit = 1, p.steps_per_split = nsteps;
  p.ws = ksplit > 1 ? ws : nullptr;
  p.counters = counters;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.N * p.Ho * p.Wo <= 0) return cudaSuccess;
  switch (tile) {
    case 1: return launch_bconv<32, 32, 2, 2, false>(p, ksplit, device, st);
    case 2: err = launch_bconv<128, 64, 4, 2, true>(p, 1, device, st); break;
    case 3: err = launch_bconv<256, 32, 8, 1, true>(p, 1, device, st); break;
    case 4:  // tile 3 with A in registers, for K = 9 steps (3x3 x 256 channels); other K take tile 3
      if (nsteps == 9) err = launch_bconv<256, 32, 8, 1, true, 9>(p, 1, device, st);
      else err = launch_bconv<256, 32, 8, 1, true>(p, 1, device, st);
      break;
    default: return launch_bconv<64, 64, 2, 2, false>(p, ksplit, device, st);
  }
  if (err == cudaErrorInvalidConfiguration) {
    cudaGetLastError();  // clear nothing sticky: the launch was never attempted
    return launch_bconv<64, 64, 2, 2, false>(p, 1, device, st);
  }
  return err;
}

// x: channels-last (N, H, W, C) of dtype; wT: (T*Cw, O) words; out (N, O, Ho, Wo) of dtype.
// ksplit > 1 needs ws, fp32 (ksplit, N, O, Ho*Wo), and counters, as for dbgen_bconv.
DBGEN_API int dbgen_pwconv(const void* x, int dtype, const void* wT, const float* scale, const float* bias, void* out,
                           float* ws, int* counters, int N, int C, int H, int W, int O, int KH, int KW, int SH, int SW, int PH, int PW,
                           int tile, int ksplit, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  PwconvParams p;
  p.x = x;
  p.wT = static_cast<const uint32_t*>(wT);
  p.scale = scale;
  p.bias = bias;
  p.out = out;
  p.N = N; p.C = C; p.H = H; p.W = W; p.Cw = (C + 31) / 32; p.O = O;
  p.KH = KH; p.KW = KW; p.SH = SH; p.SW = SW; p.PH = PH; p.PW = PW;
  p.Ho = (H + 2 * PH - KH) / SH + 1;
  p.Wo = (W + 2 * PW - KW) / SW + 1;
  p.Kw = KH * KW * p.Cw;
  if (ksplit < 1 || (ksplit > 1 && (!ws || !counters))) return cudaErrorInvalidValue;
  // fp32 keeps three bf16 planes in shared memory, so it takes 1-word chunks; 16-bit inputs take 4.
  const int KC = dtype == kF32 ? 1 : 4;
  const int nchunks = (p.Kw + KC - 1) / KC;
  p.chunks_per_split = (nchunks + ksplit - 1) / ksplit;
  ksplit = (nchunks + p.chunks_per_split - 1) / p.chunks_per_split;
  p.ws = ksplit > 1 ? ws : nullptr;
  p.counters = counters;
  const bool vec = C % 8 == 0 && (reinterpret_cast<uintptr_t>(x) % 16) == 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.N * p.Ho * p.Wo <= 0) return cudaSuccess;
  if (dtype == kF32) launch_pwconv<float, 1>(p, vec, tile, ksplit, st);
  else if (dtype == kF16) launch_pwconv<__half, 4>(p, vec, tile, ksplit, st);
  else if (dtype == kBF16) launch_pwconv<__nv_bfloat16, 4>(p, vec, tile, ksplit, st);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}
