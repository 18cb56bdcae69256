// How the weight-load pattern of the stream kernels (csrc/moe/moe_stream_kernel.cu) affects HBM
// bandwidth. Read-only kernels over 50.3 MB (Qwen3-30B-A3B's hit w13 at T = 1), 4 rotating copies (L2
// holds none), 16 back-to-back launches timed with events, best of 20:
//   mma   the stream kernels' pattern: a CTA = 16 rows (contiguous); lane (g, q) reads 16 B at K offset
//         32s + 8q of rows g and g + 8 (64 B of each of 8 rows a warp load); warps take batches of U
//         steps in turn (2U loads a lane in flight)
//   flat  the same CTA region and loads a lane, each warp load 512 contiguous bytes
// CTAs of 64 KB (16 rows of 4 KB: one wave at 6 CTAs an SM) or fewer bytes (several waves); with the
// PTX prefetch-size hints .L2::64B / 128B / 256B. Built with the CUDA kernels (target pcg_read_pattern);
// a table to stdout, and JSON to the path given:
//   build/<dir>/pcg_read_pattern [out.json]
#include <cstdint>
#include <cstdio>
#include <string>
#include <cuda_runtime.h>

// PF: 0 no prefetch-size hint, 1 .L2::64B, 2 .L2::128B, 3 .L2::256B
template <int PF = 0>
__device__ __forceinline__ uint4 ldg_nc(const uint4* p) {
  uint4 r;
  if constexpr (PF == 0)
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  else if constexpr (PF == 1)
    asm volatile("ld.global.nc.L1::no_allocate.L2::64B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  else if constexpr (PF == 2)
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  else
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

template <int U, bool MMA, int PF = 0>
__global__ void __launch_bounds__(128, 6) rd(const uint4* base, int64_t cta_vecs, int rows, unsigned* sink) {
  const uint4* p = base + blockIdx.x * cta_vecs;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  unsigned acc = 0;
  if (MMA) {
    const int64_t nvec = cta_vecs / rows;  // vectors a row
    const int64_t steps = nvec / 4;
    for (int rb = 0; rb < rows; rb += 16) {
      const uint4* ra = p + (rb + g) * nvec;
      const uint4* rbp = p + (rb + g + 8) * nvec;
      for (int64_t s = warp * U; s < steps; s += 4 * U) {
        uint4 a[U], b[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t v = (s + u) * 4 + q;
          const bool in = s + u < steps;
          a[u] = in ? ldg_nc<PF>(ra + v) : make_uint4(0, 0, 0, 0);
          b[u] = in ? ldg_nc<PF>(rbp + v) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= a[u].x ^ a[u].y ^ a[u].z ^ a[u].w ^ b[u].x ^ b[u].y ^ b[u].z ^ b[u].w;
      }
    }
  } else {
    for (int64_t i0 = static_cast<int64_t>(warp) * 2 * U * 32; i0 < cta_vecs; i0 += 4 * 2 * U * 32) {
      uint4 a[2 * U];
#pragma unroll
      for (int u = 0; u < 2 * U; ++u) {
        const int64_t i = i0 + u * 32 + lane;
        a[u] = i < cta_vecs ? ldg_nc<PF>(p + i) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < 2 * U; ++u) acc ^= a[u].x ^ a[u].y ^ a[u].z ^ a[u].w;
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

template <int U, bool MMA, int PF = 0>
float run(uint4** bufs, int64_t bytes, int64_t cta_bytes, int rows, unsigned* sink, cudaStream_t st) {
  const int64_t ctas = bytes / cta_bytes;
  const int64_t cv = cta_bytes / 16;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int w = 0; w < 8; ++w) rd<U, MMA, PF><<<ctas, 128, 0, st>>>(bufs[w % 4], cv, rows, sink);
  float best = 1e9f;
  for (int rep = 0; rep < 20; ++rep) {
    cudaEventRecord(e0, st);
    for (int i = 0; i < 16; ++i) rd<U, MMA, PF><<<ctas, 128, 0, st>>>(bufs[i % 4], cv, rows, sink);
    cudaEventRecord(e1, st);
    cudaEventSynchronize(e1);
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    best = ms < best ? ms : best;
  }
  return best * 1000.f / 16;
}

int main(int argc, char** argv) {
  const int64_t bytes = 768LL * 65536;  // 50.3 MB
  uint4* bufs[4];
  for (auto& b : bufs) {
    cudaMalloc(&b, bytes);
    cudaMemset(b, 1, bytes);
  }
  unsigned* sink;
  cudaMalloc(&sink, 4);
  cudaStream_t st;
  cudaStreamCreate(&st);
  printf("read-only, %.1f MB per call, us per call (best of 20 x 16 back to back), TB/s\n", bytes / 1e6);
  std::string json = "[";
  auto show = [&](const char* name, float us) {
    printf("  %-34s %7.2f us  %5.2f TB/s\n", name, us, bytes / us / 1e6);
    char row[256];
    snprintf(row, sizeof(row), "%s\n {\"pattern\": \"%s\", \"us\": %.3f, \"tb_per_s\": %.4f}",
             json.size() > 1 ? "," : "", name, us, bytes / us / 1e6);
    json += row;
  };
  show("mma  64 KB CTAs U=4 (up kernel)", run<4, true>(bufs, bytes, 65536, 16, sink, st));
  show("mma  64 KB CTAs U=4 L2::64B", run<4, true, 1>(bufs, bytes, 65536, 16, sink, st));
  show("mma  64 KB CTAs U=4 L2::128B", run<4, true, 2>(bufs, bytes, 65536, 16, sink, st));
  show("mma  64 KB CTAs U=4 L2::256B", run<4, true, 3>(bufs, bytes, 65536, 16, sink, st));
  show("mma  64 KB CTAs U=8 L2::128B", run<8, true, 2>(bufs, bytes, 65536, 16, sink, st));
  show("mma  64 KB CTAs U=8 L2::256B", run<8, true, 3>(bufs, bytes, 65536, 16, sink, st));
  show("mma  1.5 KB rows (w2) U=4", run<4, true>(bufs, bytes, 16 * 1536, 16, sink, st));
  show("mma  1.5 KB rows (w2) U=4 L2::128B", run<4, true, 2>(bufs, bytes, 16 * 1536, 16, sink, st));
  show("mma  1.5 KB rows (w2) U=4 L2::256B", run<4, true, 3>(bufs, bytes, 16 * 1536, 16, sink, st));
  show("flat 64 KB CTAs U=4 L2::256B", run<4, false, 3>(bufs, bytes, 65536, 16, sink, st));
  show("mma  64 KB CTAs U=8", run<8, true>(bufs, bytes, 65536, 16, sink, st));
  show("mma  32 KB CTAs U=4 (16 rows x 2 KB)", run<4, true>(bufs, bytes, 32768, 16, sink, st));
  show("mma  16 KB CTAs U=4 (16 rows x 1 KB)", run<4, true>(bufs, bytes, 16384, 16, sink, st));
  show("flat 64 KB CTAs U=4", run<4, false>(bufs, bytes, 65536, 16, sink, st));
  show("flat 64 KB CTAs U=8", run<8, false>(bufs, bytes, 65536, 16, sink, st));
  show("flat 32 KB CTAs U=4", run<4, false>(bufs, bytes, 32768, 16, sink, st));
  show("flat 16 KB CTAs U=4", run<4, false>(bufs, bytes, 16384, 16, sink, st));
  show("flat 16 KB CTAs U=2", run<2, false>(bufs, bytes, 16384, 16, sink, st));
  cudaError_t err = cudaDeviceSynchronize();
  printf("%s\n", cudaGetErrorString(err));
  if (err != cudaSuccess) return 1;
  if (argc > 1) {
    FILE* f = fopen(argv[1], "w");
    if (f == nullptr) {
      fprintf(stderr, "cannot write %s\n", argv[1]);
      return 1;
    }
    fprintf(f, "{\"mb\": %.1f, \"rows\": %s\n]}\n", bytes / 1e6, json.c_str());
    fclose(f);
    printf("wrote %s\n", argv[1]);
  }
  return 0;
}
