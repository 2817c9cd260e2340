// CUTLASS 3 (sm90) int8 GEMMs with a scaled epilogue: the reference rates of benchmarks/cutlass_gemm.py,
// to tell what bounds the int8 GEMM at DiT-XL/2's shapes (K = 1,152 and 4,608) on this card, TMA
// multicast across a 2-CTA cluster included (which Triton 3.6's Gluon does not offer).
//   D[m, n] = bf16(scale_x[m] * (scale_w[n] * acc[m, n]) + bias[n]),  acc = sum_k A[m, k] B[n, k] (int32)
// A (M, K) and B (N, K) row-major int8, D (M, N) row-major bf16. A C entry point for ctypes: no torch headers.
#include <cstdint>
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct ScaledInt8Gemm {
  using ElementA = int8_t;
  using ElementB = int8_t;
  using ElementD = cutlass::bfloat16_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;

  // s_x per row (a column vector), s_w and bias per column (row vectors)
  using ScaleX = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float>;
  using ScaleW = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using WeightScaled = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, Round>, ScaleW, Acc>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, ElementCompute, Round>,
      ScaleX, WeightScaled, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, cutlass::layout::RowMajor, 8, ElementD, cutlass::layout::RowMajor, 8,
      EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, cutlass::layout::RowMajor, 16, ElementB, cutlass::layout::ColumnMajor, 16, ElementAcc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static int run(const int8_t* a, const int8_t* b, const float* scale_x, const float* scale_w, const float* bias,
                 void* d, int m, int n, int k, cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    typename Gemm::Arguments arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {a, cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
         b, cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1))},
        {{}, nullptr, cutlass::make_cute_packed_stride(StrideC{}, make_shape(m, n, 1)),
         static_cast<ElementD*>(d), cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1))}};
    arguments.epilogue.thread = {
        {scale_x},                  // s_x[m]
        {{scale_w}, {}, {}},        // s_w[n] * acc
        {bias},                     // bias[n]
        {}};                        // multiply_add
    Gemm gemm;
    if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return 1;
    size_t workspace_size = Gemm::get_workspace_size(arguments);
    static void* workspace = nullptr;
    static size_t allocated = 0;
    if (workspace_size > allocated) {
      if (workspace) cudaFree(workspace);
      if (cudaMalloc(&workspace, workspace_size) != cudaSuccess) return 2;
      allocated = workspace_size;
    }
    if (gemm.initialize(arguments, workspace, stream) != cutlass::Status::kSuccess) return 3;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 4;
  }
};

using PingPong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiPingPong = cutlass::epilogue::TmaWarpSpecialized;
using EpiCooperative = cutlass::epilogue::TmaWarpSpecializedCooperative;

extern "C" int scaled_int8_gemm(int variant, const int8_t* a, const int8_t* b, const float* scale_x,
                                const float* scale_w, const float* bias, void* d, int m, int n, int k,
                                cudaStream_t stream) {
  switch (variant) {
    case 0:  // ping-pong, 128 x 128 x 128 tiles, no cluster (as our Gluon kernel)
      return ScaledInt8Gemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>, PingPong, EpiPingPong>::run(
          a, b, scale_x, scale_w, bias, d, m, n, k, stream);
    case 1:  // ping-pong, 2-CTA cluster along M: each weight tile multicast to both
      return ScaledInt8Gemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, PingPong, EpiPingPong>::run(
          a, b, scale_x, scale_w, bias, d, m, n, k, stream);
    case 2:  // cooperative 256 x 128 tiles (two warpgroups), 2-CTA cluster
      return ScaledInt8Gemm<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Cooperative, EpiCooperative>::run(
          a, b, scale_x, scale_w, bias, d, m, n, k, stream);
    case 3:  // cooperative 128 x 256 tiles, 2-CTA cluster along M (the 256-wide weight tile multicast)
      return ScaledInt8Gemm<Shape<_128, _256, _128>, Shape<_2, _1, _1>, Cooperative, EpiCooperative>::run(
          a, b, scale_x, scale_w, bias, d, m, n, k, stream);
    case 4:  // ping-pong, 2-CTA cluster along N: each activation tile multicast to both
      return ScaledInt8Gemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>, PingPong, EpiPingPong>::run(
          a, b, scale_x, scale_w, bias, d, m, n, k, stream);
    case 5:  // ping-pong, 64-deep K steps (more stages), 2-CTA cluster along M
      return ScaledInt8Gemm<Shape<_128, _128, _64>, Shape<_2, _1, _1>, PingPong, EpiPingPong>::run(
          a, b, scale_x, scale_w, bias, d, m, n, k, stream);
    default:
      return -1;
  }
}
