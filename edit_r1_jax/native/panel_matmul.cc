// edit_r1_jax native CPU kernel: y[r, o] = sum_k W[o, k] x[r, k] for a decode step's few rows r.
//
// Registered with XLA as the FFI custom call "edit_r1_panel_matmul" (see panel_matmul.py, which builds this file
// with the machine's g++ and -march=native). W arrives packed in panels of 32 outputs, w [P, K, 32] (P = O / 32
// rounded up, zero-padded), so that one panel is one contiguous stream; x [R, K]; y [R, P * 32].
//
// Why: in a decode step each weight meets only the batch's few rows, so the step should cost the time to read its
// weights once. XLA:CPU's library GEMM reads them at the machine's rate for one row, but for 8 rows it takes the read
// time *plus* the rows' arithmetic, not overlapped (BENCHMARKS.md, session 7). Here each weight vector is loaded
// once and meets all rows of a tile in registers (up to 8 rows x 32 outputs = 16 accumulators of 16 floats), with a
// software prefetch running ahead of the stream, so the arithmetic hides under the reads.
// Work is split over XLA's intra-op thread pool in chunks of panels taken from an atomic counter; the calling thread
// takes chunks too and only waits for chunks that a running helper has claimed, so it never waits on a helper that
// has not started (no deadlock when every pool thread is itself inside such a call).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));   // 16 floats: one AVX-512 register (two AVX2 ones elsewhere)

constexpr int64_t kPanel = 32;        // outputs per panel: two v16
constexpr int64_t kTileRows = 8;      // rows per register tile
constexpr int64_t kPrefetch = 2048;   // floats ahead in the panel stream (8 KiB; tuned on the benchmark machine)
constexpr int64_t kChunkPanels = 4;   // panels per unit of work handed to a thread

// One panel (32 outputs) for R rows: w_k32 [K, 32], xt_kr [K, R] -> y rows r at y + r * ld_y, 32 floats each.
template <int R>
void PanelTile(const float* w_k32, const float* xt_kr, int64_t K, float* y, int64_t ld_y) {
  v16 acc_lo[R], acc_hi[R];
  for (int r = 0; r < R; ++r) acc_lo[r] = acc_hi[r] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = w_k32 + k * kPanel;
    __builtin_prefetch(w + kPrefetch);
    __builtin_prefetch(w + kPrefetch + 16);
    v16 w_lo, w_hi;
    __builtin_memcpy(&w_lo, w, sizeof(v16));
    __builtin_memcpy(&w_hi, w + 16, sizeof(v16));
    const float* x_r = xt_kr + k * R;
    for (int r = 0; r < R; ++r) {
      acc_lo[r] += w_lo * x_r[r];
      acc_hi[r] += w_hi * x_r[r];
    }
  }
  for (int r = 0; r < R; ++r) {
    __builtin_memcpy(y + r * ld_y, &acc_lo[r], sizeof(v16));
    __builtin_memcpy(y + r * ld_y + 16, &acc_hi[r], sizeof(v16));
  }
}

using TileFn = void (*)(const float*, const float*, int64_t, float*, int64_t);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr,        PanelTile<1>, PanelTile<2>, PanelTile<3>, PanelTile<4>,
                                          PanelTile<5>,   PanelTile<6>, PanelTile<7>, PanelTile<8>};

struct Product {
  const float* w_pk32;
  float* y_ro;
  int64_t P, K, R, O;
  std::unique_ptr<float[]> xt;   // x in row tiles of up to 8, each transposed: tile at r0 * K is [K, rows in tile]
  int64_t n_chunks;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      for (int64_t p = c * kChunkPanels; p < std::min(P, (c + 1) * kChunkPanels); ++p)
        for (int64_t r0 = 0; r0 < R; r0 += kTileRows)
          kTiles[std::min(kTileRows, R - r0)](w_pk32 + p * K * kPanel, xt.get() + r0 * K, K, y_ro + r0 * O + p * kPanel,
                                              O);
      done.fetch_add(1);
    }
  }
};

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w_pk32, ffi::Buffer<ffi::F32> x_rk,
                       ffi::ResultBuffer<ffi::F32> y_ro) {
  auto wd = w_pk32.dimensions(), xd = x_rk.dimensions(), yd = y_ro->dimensions();
  if (wd.size() != 3 || wd[2] != kPanel || xd.size() != 2 || xd[1] != wd[1] || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != wd[0] * kPanel)
    return ffi::Error::InvalidArgument("edit_r1_panel_matmul: expected w [P, K, 32], x [R, K], y [R, P * 32]");
  auto prod = std::make_shared<Product>();
  prod->w_pk32 = w_pk32.typed_data();
  prod->y_ro = y_ro->typed_data();
  prod->P = wd[0];
  prod->K = wd[1];
  prod->R = xd[0];
  prod->O = wd[0] * kPanel;
  const int64_t K = prod->K, R = prod->R;
  const float* x = x_rk.typed_data();
  prod->xt.reset(new float[std::max<int64_t>(1, R * K)]);
  for (int64_t r0 = 0; r0 < R; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, R - r0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < rows; ++r) prod->xt[r0 * K + k * rows + r] = x[(r0 + r) * K + k];
  }
  prod->n_chunks = (prod->P + kChunkPanels - 1) / kChunkPanels;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), prod->n_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([prod] { prod->Run(); });
  prod->Run();
  while (prod->done.load() < prod->n_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EditR1PanelMatmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w [P, K, 32]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [R, K]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [R, P * 32]
