// hydra-bench-gpu: the CUDA backend's GEMMs and memory-bound kernels at the shapes of toy and
// hydra-1.6b, each timed with CUDA events (median of repeats after warm-up) and set against its
// floor: the device copy bandwidth and the bf16 GEMM rate, both measured in the same run.
//   hydra-bench-gpu [--json FILE] [--quick] [--only TEXT]
// --only TEXT runs the rows whose name contains TEXT (e.g. under a profiler), after the floors.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "autograd/cuda_context.h"
#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "autograd/optim_ops.h"
#include "bench/bench_util.h"
#include "kernels/device_runtime.h"

namespace hydra::bench {
namespace {

namespace kc = kernels::cuda;

// Median milliseconds of fn over `reps` runs after `warmup`, timed by events on the compute stream.
// The stream is held for 500 µs before each start event, so that the host has queued fn's kernels
// when the event fires: the interval is the device's time, without the host's launch gaps (which a
// training step hides by running ahead).
double time_gpu(const std::function<void()>& fn, int reps = 20, int warmup = 3) {
  void* stream = cuda_compute_stream(0);
  for (int i = 0; i < warmup; ++i) fn();
  kc::stream_synchronize(stream);
  std::vector<double> ms;
  void* a = kc::event_create();
  void* b = kc::event_create();
  for (int i = 0; i < reps; ++i) {
    kc::stream_hold(stream, 500);
    kc::event_record(a, stream);
    fn();
    kc::event_record(b, stream);
    kc::stream_synchronize(stream);
    ms.push_back(kc::event_elapsed_ms(a, b));
  }
  kc::event_destroy(a);
  kc::event_destroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

const Device kGpu = Device::cuda(0);

std::string g_only;  // --only: run the rows whose name contains it
bool selected(const std::string& what) { return what.find(g_only) != std::string::npos; }

Tensor rnd(const Shape& s, DType t = DType::kBF16, double scale = 1.0) {
  static Generator g(1);
  return randn(s, g, 0, scale, DType::kF32, kGpu).to(t);
}

struct Floors {
  double copy_gbs = 0, gemm_tflops = 0;
};

Floors measure_floors(Report& report) {
  Floors f;
  const int64_t n = int64_t{1} << 28;  // 1 GiB of f32
  Tensor src = rnd({n}, DType::kF32), dst = empty({n}, DType::kF32, kGpu);
  const double ms = time_gpu([&] {
    kc::memcpy_async(dst.raw_data(), src.raw_data(), n * 4, kc::CopyKind::kDeviceToDevice,
                     cuda_compute_stream(0));
  });
  f.copy_gbs = 2.0 * double(n) * 4 / ms / 1e6;  // read + write
  Tensor a = rnd({8192, 8192}), b = rnd({8192, 8192});
  NoGradGuard ng;
  const double gms = time_gpu([&] { (void)matmul(a, b); }, 10);
  f.gemm_tflops = 2.0 * 8192.0 * 8192.0 * 8192.0 / gms / 1e9;
  std::printf(
      "floors: device copy %.0f GB/s (1 GiB, read + write), bf16 GEMM %.0f TFLOP/s (8192^3)\n",
      f.copy_gbs, f.gemm_tflops);
  report.add({"floor", {}, {{"copy_gbs", f.copy_gbs}, {"bf16_gemm_tflops", f.gemm_tflops}}});
  return f;
}

void gemm_row(Report& report, const Floors& f, const char* what, int64_t m, int64_t k, int64_t n,
              DType dt = DType::kBF16) {
  if (!selected(what)) return;
  Tensor x = rnd({m, k}, dt), w = rnd({n, k}, dt, 0.02);
  NoGradGuard ng;
  const double ms = time_gpu([&] { (void)linear(x, w); });
  const double tflops = 2.0 * double(m) * double(k) * double(n) / ms / 1e9;
  std::printf("%-34s %6ld %6ld %6ld %9.3f %9.1f %8.2f\n", what, long(m), long(k), long(n), ms,
              tflops, tflops / f.gemm_tflops);
  report.add({"gemm",
              {{"shape", what}},
              {{"m", double(m)},
               {"k", double(k)},
               {"n", double(n)},
               {"ms", ms},
               {"tflops", tflops},
               {"of_peak", tflops / f.gemm_tflops}}});
}

// The experts of an MoE layer as one grouped GEMM (grouped_linear): E experts of `rows` rows each,
// forward only or forward + backward (dX and dW: 3x the forward's FLOPs).
void grouped_row(Report& report, const Floors& f, const std::string& what, int64_t E, int64_t rows,
                 int64_t k, int64_t n, bool backward) {
  if (!selected(what)) return;
  Tensor x = rnd({E * rows, k}), w = rnd({E, n, k}, DType::kBF16, 0.02), gy = rnd({E * rows, n});
  const std::vector<int64_t> sizes(E, rows);
  double ms = 0;
  if (backward) {
    x.set_requires_grad(true);
    w.set_requires_grad(true);
    ms = time_gpu([&] {
      x.set_grad(Tensor());
      w.set_grad(Tensor());
      grouped_linear(x, w, sizes).backward(gy);
    });
  } else {
    NoGradGuard ng;
    ms = time_gpu([&] { (void)grouped_linear(x, w, sizes); });
  }
  const double tflops =
      (backward ? 3.0 : 1.0) * 2.0 * double(E * rows) * double(k) * double(n) / ms / 1e9;
  std::printf("%-34s %6ld %6ld %6ld %9.3f %9.1f %8.2f\n", what.c_str(), long(E * rows), long(k),
              long(n), ms, tflops, tflops / f.gemm_tflops);
  report.add({"gemm",
              {{"shape", what}},
              {{"m", double(E * rows)},
               {"k", double(k)},
               {"n", double(n)},
               {"ms", ms},
               {"tflops", tflops},
               {"of_peak", tflops / f.gemm_tflops}}});
}

// Query-key pairs a causal pattern keeps in a sequence of L: dense (window 0), or a window and the
// global positions (multiples of the stride; stride 0: none, the window alone), as the kernels read
// it.
double visible_pairs(int64_t L, const AttentionPattern& pat) {
  const int64_t window = pat.window, stride = pat.global_stride;
  if (window <= 0) return double(L) * double(L + 1) / 2;
  double pairs = 0;
  for (int64_t t = 0; t < L; ++t) {
    if (stride <= 0) {
      pairs += double(std::min(t + 1, window));
      continue;
    }
    // A global query sees every key; another its window and the global keys before the window.
    const int64_t before_window = t >= window ? (t - window) / stride + 1 : 0;
    pairs += double(t % stride == 0 ? t + 1 : std::min(t + 1, window) + before_window);
  }
  return pairs;
}

// The attention op (bf16) forward, or forward + backward, on a pattern: toy's sparse global
// attention (window 512, global stride 256), its window part alone, or the Transformer's dense
// causal attention (the shapes bench/attention_compare.py times with PyTorch's SDPA backends,
// cuDNN's among them). cuDNN's fused attention for the window and causal rows where it takes them
// (the default, HYDRA_ATTENTION=auto; its deterministic backward, the process default), our kernels
// for the rest or with HYDRA_ATTENTION=ours. FLOPs are the useful ones: 4 * head_dim per kept pair
// forward, 3.5x that with the backward.
void attention_row(Report& report, const Floors& f, const std::string& what, int64_t B, int64_t L,
                   int64_t H, int64_t dh, bool backward,
                   const AttentionPattern& pat = AttentionPattern{512, 256}) {
  if (!selected(what)) return;
  Tensor q = rnd({B, L, H, dh}), k = rnd({B, L, H, dh}), v = rnd({B, L, H, dh}),
         go = rnd({B, L, H, dh});
  const double scale = 1.0 / std::sqrt(double(dh));
  double ms = 0;
  if (backward) {
    for (Tensor* t : {&q, &k, &v}) t->set_requires_grad(true);
    ms = time_gpu([&] {
      for (Tensor* t : {&q, &k, &v}) t->set_grad(Tensor());
      sparse_attention(q, k, v, pat, scale).backward(go);
    });
  } else {
    NoGradGuard ng;
    ms = time_gpu([&] { (void)sparse_attention(q, k, v, pat, scale); });
  }
  const double flops =
      (backward ? 3.5 : 1.0) * 4.0 * double(dh) * visible_pairs(L, pat) * double(B * H);
  const double tflops = flops / ms / 1e9;
  std::printf("%-44s %9.3f %9.1f %8.2f\n", what.c_str(), ms, tflops, tflops / f.gemm_tflops);
  report.add({"gemm",
              {{"shape", what}},
              {{"ms", ms}, {"tflops", tflops}, {"of_peak", tflops / f.gemm_tflops}}});
}

// GB/s of one device-to-device copy moving `bytes` in all (half read, half written): the floor at
// an op's own size, where launch latency and the tail of the grid weigh more than at 1 GiB.
double copy_gbs_at(double bytes) {
  const auto n = static_cast<int64_t>(bytes / 2 / 4);  // f32 elements copied
  Tensor src = rnd({n}, DType::kF32), dst = empty({n}, DType::kF32, kGpu);
  const double ms = time_gpu([&] {
    kc::memcpy_async(dst.raw_data(), src.raw_data(), n * 4, kc::CopyKind::kDeviceToDevice,
                     cuda_compute_stream(0));
  });
  return 2.0 * double(n) * 4 / ms / 1e6;
}

// A memory-bound op's rate against the 1 GiB copy floor and against a copy of its own size.
void bandwidth_row(Report& report, const Floors& f, const std::string& what, double bytes,
                   const std::function<void()>& fn) {
  if (!selected(what)) return;
  const double ms = time_gpu(fn);
  const double gbs = bytes / ms / 1e6, same = copy_gbs_at(bytes);
  std::printf("%-44s %9.3f %9.0f %8.2f %8.2f\n", what.c_str(), ms, gbs, gbs / f.copy_gbs,
              gbs / same);
  report.add({"bandwidth",
              {{"kernel", what}},
              {{"ms", ms},
               {"bytes", bytes},
               {"gbs", gbs},
               {"of_copy", gbs / f.copy_gbs},
               {"copy_same_size_gbs", same},
               {"of_copy_same_size", gbs / same}}});
}

// The toy step's memory-bound ops at 32768 tokens (4 x 8192), device time against the bytes they
// must move (reads + writes of their operands; the scratch they add is theirs to lose).
void toy_step_rows(Report& report, const Floors& f) {
  const int64_t B = 4, L = 8192, T = B * L, d = 384, di = 768, N = 16;
  {  // the SSM's causal conv (width 4, SiLU): fwd reads x, writes y; bwd reads x, gy, writes gx
    Tensor x = rnd({B, L, di}), w = rnd({di, 4}, DType::kBF16, 0.5),
           b = rnd({di}, DType::kBF16, 0.5), gy = rnd({B, L, di});
    {
      NoGradGuard ng;
      bandwidth_row(report, f, "toy32k conv1d fwd [4, 8192, 768]", 2.0 * T * di * 2,
                    [&] { (void)causal_conv1d(x, w, b, Tensor(), true); });
    }
    for (Tensor* t : {&x, &w, &b}) t->set_requires_grad(true);
    bandwidth_row(report, f, "toy32k conv1d fwd+bwd [4, 8192, 768]", 5.0 * T * di * 2, [&] {
      for (Tensor* t : {&x, &w, &b}) t->set_grad(Tensor());
      causal_conv1d(x, w, b, Tensor(), true).backward(gy);
    });
  }
  {  // the selective scan: u, delta, z in and y out [T, 768] (B, C [T, 16] are small)
    Tensor u = rnd({B, L, di}), dt = rnd({B, L, di}, DType::kBF16, 0.5), z = rnd({B, L, di});
    Tensor A = rnd({di, N}, DType::kBF16, 0.3), Bm = rnd({B, L, N}), Cm = rnd({B, L, N}),
           D = rnd({di}), bias = rnd({di});
    {
      NoGradGuard ng;
      bandwidth_row(report, f, "toy32k selective_scan fwd [4, 8192, 768, N 16]", 4.0 * T * di * 2,
                    [&] { (void)selective_scan(u, dt, A, Bm, Cm, D, bias, z, Tensor()); });
    }
    // The forward at other splits of the same tokens and at hydra-1.6b's width (4096 channels,
    // 8K x 4): where the lanes form's blocks (batch * channels / 8) fill the device or not.
    for (const auto& [sb, sl, sd] :
         std::vector<std::array<int64_t, 3>>{{1, 32768, 768}, {16, 2048, 768}, {4, 8192, 4096}}) {
      NoGradGuard ng;
      Tensor su = rnd({sb, sl, sd}), sdt = rnd({sb, sl, sd}, DType::kBF16, 0.5),
             sz = rnd({sb, sl, sd}), sA = rnd({sd, N}, DType::kBF16, 0.3), sB = rnd({sb, sl, N}),
             sC = rnd({sb, sl, N}), sD = rnd({sd}), sbias = rnd({sd});
      bandwidth_row(report, f,
                    "selective_scan fwd [" + std::to_string(sb) + ", " + std::to_string(sl) + ", " +
                        std::to_string(sd) + ", N 16]",
                    4.0 * sb * sl * sd * 2,
                    [&] { (void)selective_scan(su, sdt, sA, sB, sC, sD, sbias, sz, Tensor()); });
    }
    Tensor gy = rnd({B, L, di});
    for (Tensor* t : {&u, &dt, &z, &Bm, &Cm}) t->set_requires_grad(true);
    bandwidth_row(report, f, "toy32k selective_scan fwd+bwd [4, 8192, 768, N 16]",
                  11.0 * T * di * 2, [&] {
                    for (Tensor* t : {&u, &dt, &z, &Bm, &Cm}) t->set_grad(Tensor());
                    selective_scan(u, dt, A, Bm, Cm, D, bias, z, Tensor()).y.backward(gy);
                  });
    {  // the paper's form: one state per channel (the floor: the same 11 passes of bytes)
      Tensor A1 = rnd({di, 1}, DType::kBF16, 0.3), B1 = rnd({B, L, 1}), C1 = rnd({B, L, 1});
      bandwidth_row(report, f, "toy32k selective_scan fwd+bwd [4, 8192, 768, N 1]",
                    11.0 * T * di * 2, [&] {
                      for (Tensor* t : {&u, &dt, &z}) t->set_grad(Tensor());
                      selective_scan(u, dt, A1, B1, C1, D, bias, z, Tensor()).y.backward(gy);
                    });
    }
    // The SSD form on the same tokens: 12 heads of 64 channels, chunks of 64 steps (fused kernels,
    // and composed of ops for comparison). Its floor is
    // the same bytes (u, delta, z in, y out; fwd+bwd 11 passes) as the fused scan's.
    const int64_t H = di / 64;
    Tensor dth = rnd({B, L, H}, DType::kBF16, 0.5), Ah = rnd({H}, DType::kBF16, 0.3),
           biash = rnd({H});
    {
      NoGradGuard ng;
      bandwidth_row(report, f, "toy32k ssd_scan fwd [4, 8192, 12 x 64, N 16]", 4.0 * T * di * 2,
                    [&] { (void)ssd_scan(u, dth, Ah, Bm, Cm, D, biash, z, Tensor()); });
    }
    dth.set_requires_grad(true);
    bandwidth_row(report, f, "toy32k ssd_scan fwd+bwd [4, 8192, 12 x 64, N 16]", 11.0 * T * di * 2,
                  [&] {
                    for (Tensor* t : {&u, &dth, &z, &Bm, &Cm}) t->set_grad(Tensor());
                    ssd_scan(u, dth, Ah, Bm, Cm, D, biash, z, Tensor()).y.backward(gy);
                  });
    bandwidth_row(report, f, "toy32k ssd_scan composed fwd+bwd [4, 8192, 12 x 64, N 16]",
                  11.0 * T * di * 2, [&] {
                    for (Tensor* t : {&u, &dth, &z, &Bm, &Cm}) t->set_grad(Tensor());
                    ssd_scan_composed(u, dth, Ah, Bm, Cm, D, biash, z, Tensor()).y.backward(gy);
                  });
  }
  {  // both forms at hydra-1.6b's width (4096 channels: 64 heads of 64), 2 x 8K
    const int64_t sb = 2, sl = 8192, sd = 4096, sh = sd / 64, st = sb * sl;
    Tensor u = rnd({sb, sl, sd}), z = rnd({sb, sl, sd}), gy = rnd({sb, sl, sd}),
           dt = rnd({sb, sl, sd}, DType::kBF16, 0.5), A = rnd({sd, N}, DType::kBF16, 0.3),
           Bm = rnd({sb, sl, N}), Cm = rnd({sb, sl, N}), D = rnd({sd}), bias = rnd({sd}),
           dth = rnd({sb, sl, sh}, DType::kBF16, 0.5), Ah = rnd({sh}, DType::kBF16, 0.3),
           biash = rnd({sh});
    for (Tensor* t : {&u, &dt, &dth, &z, &Bm, &Cm}) t->set_requires_grad(true);
    bandwidth_row(report, f, "1.6B selective_scan fwd+bwd [2, 8192, 4096, N 16]",
                  11.0 * st * sd * 2, [&] {
                    for (Tensor* t : {&u, &dt, &z, &Bm, &Cm}) t->set_grad(Tensor());
                    selective_scan(u, dt, A, Bm, Cm, D, bias, z, Tensor()).y.backward(gy);
                  });
    bandwidth_row(report, f, "1.6B ssd_scan fwd+bwd [2, 8192, 64 x 64, N 16]", 11.0 * st * sd * 2,
                  [&] {
                    for (Tensor* t : {&u, &dth, &z, &Bm, &Cm}) t->set_grad(Tensor());
                    ssd_scan(u, dth, Ah, Bm, Cm, D, biash, z, Tensor()).y.backward(gy);
                  });
  }
  {  // a block's combine: x + 3 paths * gate * mix; fwd reads x and the outputs, writes y (5
     // passes); bwd reads gy and the outputs, writes their gradients (7 more). The composed ops
     // (mul, mul, add a path, and their backward) on the same bytes for comparison.
    std::vector<Tensor> in = {rnd({B, L, d})};
    for (int i = 0; i < 3; ++i) in.push_back(rnd({B, L, d}));
    for (int i = 0; i < 3; ++i) in.push_back(rnd({d}));
    in.push_back(rnd({B, L, 3}));
    for (Tensor& t : in) t.set_requires_grad(true);
    const std::vector<Tensor> outs(in.begin() + 1, in.begin() + 4),
        gates(in.begin() + 4, in.begin() + 7);
    const Tensor gy = rnd({B, L, d});
    {
      NoGradGuard ng;
      bandwidth_row(report, f, "toy32k gated_residual fwd [4, 8192, 384, 3 paths, mix]",
                    5.0 * T * d * 2, [&] { (void)gated_residual(in[0], outs, gates, in[7]); });
    }
    bandwidth_row(report, f, "toy32k gated_residual fwd+bwd [4, 8192, 384, 3 paths, mix]",
                  12.0 * T * d * 2, [&] {
                    for (Tensor& t : in) t.set_grad(Tensor());
                    gated_residual(in[0], outs, gates, in[7]).backward(gy);
                  });
    bandwidth_row(report, f, "toy32k gated_residual composed fwd+bwd (mul, mul, add)",
                  12.0 * T * d * 2, [&] {
                    for (Tensor& t : in) t.set_grad(Tensor());
                    const auto mix = split(in[7], {1, 1, 1}, 2);
                    Tensor y = in[0];
                    for (int i = 0; i < 3; ++i) y = add(y, mul(mul(outs[i], gates[i]), mix[i]));
                    y.backward(gy);
                  });
  }
  NoGradGuard ng;
  {  // the MoE combine: 2 expert rows per token added into [T, d]
    Tensor table = rnd({T, d}), src = rnd({2 * T, d});
    std::vector<int64_t> idx(2 * T);
    for (int64_t i = 0; i < 2 * T; ++i) idx[i] = (i * 7919) % T;  // each token twice, scattered
    const Tensor index = tensor(idx, {2 * T}).to(kGpu);
    bandwidth_row(report, f, "toy32k scatter_add_rows [65536 -> 32768, 384]", 4.0 * T * d * 2,
                  [&] { scatter_add_rows_(table, index, src); });
  }
  {  // the LayerScale gate and the controller's mix: broadcast multiplies
    Tensor x = rnd({B, L, d}), g = rnd({d}), m = rnd({B, L, 1});
    bandwidth_row(report, f, "toy32k mul [4, 8192, 384] x [384]", 2.0 * T * d * 2,
                  [&] { (void)mul(x, g); });
    bandwidth_row(report, f, "toy32k mul [4, 8192, 384] x [4, 8192, 1]", 2.0 * T * d * 2,
                  [&] { (void)mul(x, m); });
  }
  {  // the PKM's top-k: 32 of each half's 64 sub-key scores, then 32 of the 119 candidate cells
     // (4 heads x 32768 tokens); reads the scores, writes values and i64 indices
    const int64_t rows = 4 * T;
    Tensor s64 = rnd({rows, 64}), s119 = rnd({rows, 119});
    bandwidth_row(report, f, "toy32k topk 32 of 64 [131072 rows]", rows * (64.0 * 2 + 32 * 10.0),
                  [&] { (void)topk(s64, 32); });
    bandwidth_row(report, f, "toy32k topk 32 of 119 [131072 rows]", rows * (119.0 * 2 + 32 * 10.0),
                  [&] { (void)topk(s119, 32); });
  }
  {  // the PKM's bag: 32768 tokens, 4 heads x 32 lookups each into 4096 rows of 384 (the dense
     // form: kernels/pkm.h); bytes: the output, the indices and weights, the table
    const int64_t m = 128, R = 4096;
    Generator gi(5);
    const Tensor table = rnd({R, d}), w = rnd({T, m});
    const Tensor index = randint(0, R, {T, m}, gi).to(kGpu);
    const double bytes = T * d * 2.0 + T * m * 10.0 + R * d * 2.0;
    bandwidth_row(report, f, "toy32k embedding_bag fwd [32768 x 128 of 4096, 384]", bytes,
                  [&] { (void)embedding_bag(table, index, w); });
    Tensor tl = table.detach().clone(), wl = w.detach().clone();
    tl.set_requires_grad(true);
    wl.set_requires_grad(true);
    const Tensor gy = rnd({T, d});
    bandwidth_row(report, f, "toy32k embedding_bag fwd+bwd [32768 x 128 of 4096, 384]", 3 * bytes,
                  [&] {
                    const EnableGradGuard grad;
                    tl.set_grad(Tensor());
                    wl.set_grad(Tensor());
                    embedding_bag(tl, index, wl).backward(gy);
                  });
  }
  {  // a split's slice made contiguous; a column sum (a gate's gradient); short row sums (PKM)
    Tensor xz = rnd({B, L, 2 * di});
    const Tensor half = xz.narrow(2, 0, di);
    bandwidth_row(report, f, "toy32k copy of a slice [4, 8192, 768 of 1536]", 2.0 * T * di * 2,
                  [&] { (void)half.contiguous(); });
    Tensor y = rnd({T, d});
    bandwidth_row(report, f, "toy32k sum over rows [32768, 384] -> [384]", 1.0 * T * d * 2,
                  [&] { (void)sum(y, {0}); });
    Tensor s = rnd({131072, 32, 32});
    bandwidth_row(report, f, "toy32k sum of rows of 32 [131072, 32, 32]",
                  1.0 * 131072 * 32 * 32 * 2, [&] { (void)sum(s, {2}); });
  }
}

// The benchmark's list of rows (about 160 lines): one call per row, in the report's order.
int run(int argc, char** argv) {
  std::string json;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc)
      json = argv[++i];
    else if (a == "--quick")
      quick = true;
    else if (a == "--only" && i + 1 < argc)
      g_only = argv[++i];
    else if (a == "--help" || a == "-h") {
      std::printf(
          "hydra-bench-gpu: the CUDA backend's GEMMs, sparse attention and memory-bound kernels at "
          "the shapes\n"
          "of toy and hydra-1.6b, each against its floor measured in the same run (device copy of "
          "1 GiB,\n"
          "bf16 GEMM 8192^3) and, for memory-bound ops, a copy of the op's own size. Times are "
          "CUDA-event\n"
          "medians of 20 calls after 3 warm-up calls, with the stream held before each start event "
          "so that\n"
          "they measure the device. Compare with PyTorch: bench/torch_compare.py, then "
          "bench/gpu_report.py.\n\n"
          "  --json FILE   also write the rows as JSON (for bench/gpu_report.py)\n"
          "  --quick       skip the toy-shape GEMM and attention rows\n"
          "  --only TEXT   run only the rows whose name contains TEXT (e.g. under ncu)\n");
      return 0;
    } else {
      std::fprintf(stderr,
                   "hydra-bench-gpu: unknown argument '%s' (expected --json FILE, --quick, --only "
                   "TEXT; see --help)\n",
                   a.c_str());
      return 2;
    }
  }
  if (!cuda_available()) {
    std::fprintf(stderr,
                 "hydra-bench-gpu: no CUDA device (run it on a machine with an NVIDIA GPU)\n");
    return 1;
  }
  std::printf("hydra-bench-gpu on %s\n", kc::device_name(0).c_str());
  Report report;
  const Floors f = measure_floors(report);

  std::printf("\n%-34s %6s %6s %6s %9s %9s %8s\n", "GEMM (bf16, fp32 accumulate)", "M", "K", "N",
              "ms", "TFLOP/s", "of peak");
  const int64_t T = 16384;  // tokens per GPU step at 1.6B (e.g. 2 x 8192)
  gemm_row(report, f, "1.6B ssm in_proj", T, 2048, 8192);
  gemm_row(report, f, "1.6B ssm out_proj", T, 4096, 2048);
  gemm_row(report, f, "1.6B sga qkv", T, 2048, 6144);
  gemm_row(report, f, "1.6B expert up (T/4 rows)", T / 4, 2048, 512);
  gemm_row(report, f, "1.6B expert down (T/4 rows)", T / 4, 512, 2048);
  gemm_row(report, f, "1.6B lm head", 8192, 2048, 50304);
  // The toy at 32768 tokens per step: its largest projections and its narrow ones (the router in
  // fp32).
  gemm_row(report, f, "toy32k ssm in_proj", 32768, 384, 1536);
  gemm_row(report, f, "toy32k sga qkv", 32768, 384, 1152);
  gemm_row(report, f, "toy32k ssm x_proj", 32768, 768, 56);
  gemm_row(report, f, "toy32k ssm dt_proj", 32768, 24, 768);
  gemm_row(report, f, "toy32k router (fp32)", 4096, 384, 8, DType::kF32);
  // The MoE layer's experts in one launch: 8 experts, each T/4 rows (2 of 8 active per chunk).
  for (const bool bwd : {false, true}) {
    const std::string pass = bwd ? " fwd+bwd" : "";
    grouped_row(report, f, "1.6B 8 experts up, grouped" + pass, 8, T / 4, 2048, 512, bwd);
    grouped_row(report, f, "1.6B 8 experts down, grouped" + pass, 8, T / 4, 512, 2048, bwd);
  }
  if (!quick) {
    gemm_row(report, f, "toy ssm in_proj", T, 384, 1536);
    gemm_row(report, f, "toy ssm out_proj", T, 768, 384);
    gemm_row(report, f, "toy expert up (T/4 rows)", T / 4, 384, 192);
    gemm_row(report, f, "toy lm head", 8192, 384, 8192);
    grouped_row(report, f, "toy 8 experts up, grouped", 8, T / 4, 384, 192, false);
    grouped_row(report, f, "toy 8 experts up, grouped fwd+bwd", 8, T / 4, 384, 192, true);
  }

  std::printf("\n%-44s %9s %9s %8s\n", "sparse attention (bf16)", "ms", "TFLOP/s", "of peak");
  for (const bool bwd : {false, true}) {
    const std::string pass = bwd ? " fwd+bwd" : " fwd";
    attention_row(report, f, "1.6B attention [8 x 2048, 16 x 128]" + pass, 8, 2048, 16, 128, bwd);
    if (!quick) {
      attention_row(report, f, "toy attention [16 x 2048, 6 x 64]" + pass, 16, 2048, 6, 64, bwd);
      // Long sequences: every fourth 64-query tile holds a global query and walks every key.
      attention_row(report, f, "toy attention [4 x 8192, 6 x 64]" + pass, 4, 8192, 6, 64, bwd);
      attention_row(report, f, "toy attention [1 x 32768, 6 x 64]" + pass, 1, 32768, 6, 64, bwd);
    }
  }
  // Dense causal (transformer-toy's attention) and the sliding window alone, 32,768 tokens a call
  // (the throughput benchmark's step).
  for (const bool bwd : {false, true}) {
    const std::string pass = bwd ? " fwd+bwd" : " fwd";
    for (const int64_t L : {int64_t{2048}, int64_t{8192}, int64_t{32768}}) {
      if (quick) break;
      const int64_t B = 32768 / L;
      const std::string shape =
          " [" + std::to_string(B) + " x " + std::to_string(L) + ", 6 x 64]" + pass;
      attention_row(report, f, "causal attention" + shape, B, L, 6, 64, bwd, AttentionPattern{});
      attention_row(report, f, "window-512 attention" + shape, B, L, 6, 64, bwd,
                    AttentionPattern{512, 0});
    }
  }

  std::printf("\n%-44s %9s %9s %8s %8s\n", "memory-bound (bf16 unless noted)", "ms", "GB/s",
              "of copy", "of same-size copy");
  const int64_t d = 2048;
  // Model widths: 2048 (hydra-1.6b) and 384 (toy); vocabularies 50304 and 8192.
  for (const int64_t width : {int64_t{2048}, int64_t{384}}) {
    const std::string shape = "[" + std::to_string(T) + ", " + std::to_string(width) + "]";
    Tensor x = rnd({T, width}), w = rnd({width}), gy = rnd({T, width});
    {
      NoGradGuard ng;
      bandwidth_row(report, f, "rms_norm fwd " + shape, 2.0 * T * width * 2,
                    [&] { (void)rms_norm(x, w); });
    }
    x.set_requires_grad(true);
    w.set_requires_grad(true);
    bandwidth_row(report, f, "rms_norm fwd+bwd " + shape, 5.0 * T * width * 2, [&] {
      x.set_grad(Tensor());  // gradients into fresh buffers, as after zero_grad (no accumulation)
      w.set_grad(Tensor());
      Tensor y = rms_norm(x, w);
      y.backward(gy);
    });
    Tensor xs = rnd({T, width}, DType::kBF16, 3.0);
    NoGradGuard ng;
    bandwidth_row(report, f, "softmax fwd " + shape, 2.0 * T * width * 2,
                  [&] { (void)softmax(xs); });
  }
  for (const auto& [rows, V] : {std::pair<int64_t, int64_t>{8192, 50304}, {16384, 8192}}) {
    const std::string shape = "[" + std::to_string(rows) + ", " + std::to_string(V) + "]";
    Tensor logits = rnd({rows, V}, DType::kBF16, 2.0);
    Generator g(2);
    Tensor targets = randint(0, V, {rows}, g, DType::kI64, kGpu);
    {
      NoGradGuard ng;
      bandwidth_row(report, f, "cross_entropy fwd " + shape, 1.0 * rows * V * 2,
                    [&] { (void)cross_entropy(logits, targets); });
    }
    logits.set_requires_grad(true);
    bandwidth_row(report, f, "cross_entropy fwd+bwd " + shape, 3.0 * rows * V * 2, [&] {
      logits.set_grad(Tensor());
      Tensor l = cross_entropy(logits, targets);
      l.backward();
    });
  }
  {
    Tensor x = rnd({T, 8192});
    NoGradGuard ng;
    bandwidth_row(report, f, "silu [16384, 8192]", 2.0 * T * 8192 * 2, [&] { (void)silu(x); });
    Tensor y = rnd({T, 8192});
    bandwidth_row(report, f, "mul [16384, 8192]", 3.0 * T * 8192 * 2, [&] { (void)mul(x, y); });
  }
  {
    Tensor table = rnd({50304, d});
    Generator g(3);
    Tensor idx = randint(0, 50304, {T}, g, DType::kI64, kGpu);
    NoGradGuard ng;
    bandwidth_row(report, f, "embedding fwd [16384 of 50304 x 2048]", 2.0 * T * d * 2,
                  [&] { (void)embedding(table, idx); });
  }
  {
    const int64_t n = int64_t{100} << 20;  // 100M f32 parameters
    Tensor p = rnd({n}, DType::kF32), g = rnd({n}, DType::kF32), m = rnd({n}, DType::kF32, 0.1),
           v = exp(rnd({n}, DType::kF32));
    const AdamWHyper h = adamw_hyper(1e-4, 0.9, 0.95, 1e-8, 0.1, 10, 1.0);
    bandwidth_row(report, f, "adamw f32 [100M params]", 28.0 * n,
                  [&] { adamw_update(p, g, m, v, h); });
    // The optimizer's real case: many tensors (here 400 of 256K) in a few fused launches.
    std::vector<AdamWEntry> many;
    const int64_t k = 400, each = n / k;
    for (int64_t i = 0; i < k; ++i)
      many.push_back({p.narrow(0, i * each, each), g.narrow(0, i * each, each),
                      m.narrow(0, i * each, each), v.narrow(0, i * each, each), 1e-4, 0.1});
    bandwidth_row(report, f, "adamw f32 [400 tensors, 100M params]", 28.0 * n,
                  [&] { adamw_update_many(many, h); });
  }
  toy_step_rows(report, f);
  if (!json.empty()) {
    report.write_json(json, {{"device", kc::device_name(0)}});
    std::printf("\nwrote %s\n", json.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace hydra::bench

int main(int argc, char** argv) { return hydra::bench::run(argc, argv); }
