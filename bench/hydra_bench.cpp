// hydra-bench: CPU micro-benchmarks of the engine's core ops. Prints a table and writes JSON.
//   hydra-bench [--json FILE] [--only matmul|scan|attention|checkpoint|stats] [--quick]
// Matmul: our op (engine + OpenBLAS) against a bare cblas_sgemm call on the same shape; the best
// bare sgemm rate measured here is the machine's practical peak. Scan: the fused selective scan
// forward and forward+backward in state updates per second (B*L*D*N / time). Stats: the host's work
// of a statistics step (train.stats_every) for one MoE layer at the toy's routing shapes.
#include <cblas.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "bench/bench_util.h"
#include "configs/config_io.h"
#include "data/hdf5_file.h"
#include "kernels/base/parallel.h"
#include "model/moe.h"
#include "trainer/crc32c.h"

namespace hydra::bench {
namespace {

struct MatmulShape {
  const char* what;
  int64_t m, k, n;
};

void bench_matmul(Report& report, bool quick) {
  std::vector<MatmulShape> shapes = {
      {"square 256", 256, 256, 256},
      {"square 1024", 1024, 1024, 1024},
      {"square 2048", 2048, 2048, 2048},
      {"toy in_proj (1024 tok)", 1024, 384, 1536},
      {"toy out_proj (1024 tok)", 1024, 768, 384},
      {"toy expert up (1024 tok)", 1024, 384, 192},
      {"tiny in_proj (2048 tok)", 2048, 64, 256},
      {"tiny lm head (2048 tok)", 2048, 64, 256},
  };
  if (quick) shapes.resize(2);
  std::printf("\n%-26s %6s %6s %6s %12s %12s %8s\n", "matmul (f32)", "M", "K", "N", "ours GF/s",
              "sgemm GF/s", "ratio");
  double peak = 0;
  for (const auto& s : shapes) {
    Generator g(1);
    Tensor a = randn({s.m, s.k}, g), b = randn({s.k, s.n}, g);
    Tensor c = empty({s.m, s.n});
    const double flops = 2.0 * s.m * s.n * s.k;
    const int reps = flops > 4e9 ? 5 : 9;
    const Timing ours = time_cpu([&] { (void)matmul(a, b); }, reps);
    openblas_set_num_threads(
        num_threads());  // the bare call threads itself; the engine keeps BLAS at 1
    const Timing raw = time_cpu(
        [&] {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s.m, s.n, s.k, 1.0f,
                      a.data<float>(), s.k, b.data<float>(), s.n, 0.0f, c.data<float>(), s.n);
        },
        reps);
    openblas_set_num_threads(1);
    const double ours_gf = flops / ours.median_ms / 1e6, raw_gf = flops / raw.median_ms / 1e6;
    peak = std::max(peak, raw_gf);
    std::printf("%-26s %6ld %6ld %6ld %12.1f %12.1f %8.2f\n", s.what, s.m, s.k, s.n, ours_gf,
                raw_gf, ours_gf / raw_gf);
    report.add({"matmul",
                {{"shape", s.what}},
                {{"m", double(s.m)},
                 {"k", double(s.k)},
                 {"n", double(s.n)},
                 {"median_ms", ours.median_ms},
                 {"gflops", ours_gf},
                 {"sgemm_gflops", raw_gf}}});
  }
  std::printf("practical peak (best bare OpenBLAS sgemm here): %.1f GFLOP/s\n", peak);
  report.add({"matmul_peak", {}, {{"sgemm_peak_gflops", peak}}});
}

// x = exp(x) with glibc's vector exp on all threads (this file is built with -ffast-math, like the
// scan kernel, so the loop compiles to the same vector exp).
void vector_exp_chunk(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}
// `count` exps, in passes over a 4096-float buffer per thread that stays in L1 (as the kernel's
// block of decays does): the exp throughput, not memory bandwidth.
void vector_exp(int64_t count) {
  constexpr int64_t kBuf = 4096;
  const int64_t passes = (count + kBuf - 1) / kBuf;
  parallel_for(passes, 64, [&](int64_t b, int64_t e) {
    std::vector<float> buf(kBuf, -0.5f);
    for (int64_t p = b; p < e; ++p) {
      vector_exp_chunk(buf.data(), kBuf);
      for (float& v : buf) v = -v;  // keep values in range
    }
  });
}

struct ScanShape {
  const char* what;
  int64_t batch, len, dim, state;
};

void bench_scan(Report& report, bool quick) {
  std::vector<ScanShape> shapes = {
      {"tiny (d_inner 128, N 8)", 8, 256, 128, 8},
      {"toy  (d_inner 768, N 16)", 1, 1024, 768, 16},
      {"toy  batch 4, seq 512", 4, 512, 768, 16},
  };
  if (quick) shapes.resize(1);
  std::printf("\n%-26s %5s %5s %5s %4s %10s %10s %12s %12s %10s\n", "selective scan (f32)", "B",
              "L", "D", "N", "fwd ms", "fwd+bwd ms", "fwd Mupd/s", "f+b Mupd/s", "exp floor");
  for (const auto& s : shapes) {
    Generator g(2);
    auto leaf = [&](const Shape& shape, double scale) {
      Tensor t = randn(shape, g, 0, scale);
      t.set_requires_grad(true);
      return t;
    };
    Tensor u = leaf({s.batch, s.len, s.dim}, 1), dt = leaf({s.batch, s.len, s.dim}, 1),
           A = leaf({s.dim, s.state}, 0.5);
    Tensor B = leaf({s.batch, s.len, s.state}, 1), C = leaf({s.batch, s.len, s.state}, 1);
    Tensor D = leaf({s.dim}, 1), bias = leaf({s.dim}, 0.5), z = leaf({s.batch, s.len, s.dim}, 1);
    const Timing fwd = time_cpu([&] {
      NoGradGuard ng;
      (void)selective_scan(u, dt, A, B, C, D, bias, z, Tensor());
    });
    const Timing both = time_cpu([&] {
      auto r = selective_scan(u, dt, A, B, C, D, bias, z, Tensor());
      r.y.backward(ones_like(r.y));
    });
    const double updates = double(s.batch) * s.len * s.dim * s.state;
    // The forward needs exp(delta * A) once per state update: the time of that many vectorised,
    // cache-resident exps on all threads is its floor.
    const Timing exp_floor = time_cpu([&] { vector_exp(static_cast<int64_t>(updates)); });
    std::printf("%-26s %5ld %5ld %5ld %4ld %10.2f %10.2f %12.1f %12.1f %8.2fms\n", s.what, s.batch,
                s.len, s.dim, s.state, fwd.median_ms, both.median_ms, updates / fwd.median_ms / 1e3,
                updates / both.median_ms / 1e3, exp_floor.median_ms);
    report.add({"selective_scan",
                {{"shape", s.what}},
                {{"batch", double(s.batch)},
                 {"len", double(s.len)},
                 {"dim", double(s.dim)},
                 {"state", double(s.state)},
                 {"fwd_ms", fwd.median_ms},
                 {"fwd_bwd_ms", both.median_ms},
                 {"fwd_updates_per_s", updates / fwd.median_ms * 1e3},
                 {"fwd_bwd_updates_per_s", updates / both.median_ms * 1e3},
                 {"exp_floor_ms", exp_floor.median_ms}}});
  }
}

struct AttentionShape {
  const char* what;
  int64_t batch, len, heads, head_dim, window, stride;
};

void bench_attention(Report& report, bool quick) {
  std::vector<AttentionShape> shapes = {
      {"tiny SGA (window 64, stride 32)", 8, 256, 4, 16, 64, 32},
      {"toy SGA (window 512, stride 256)", 1, 2048, 6, 64, 512, 256},
      {"toy dense causal", 1, 2048, 6, 64, 0, 0},
  };
  if (quick) shapes.resize(1);
  std::printf("\n%-34s %5s %5s %3s %4s %9s %10s %9s %9s\n", "sparse attention (f32)", "B", "L", "H",
              "dh", "fwd ms", "fwd+bwd ms", "fwd GF/s", "f+b GF/s");
  for (const auto& s : shapes) {
    Generator g(3);
    auto leaf = [&] {
      Tensor t = randn({s.batch, s.len, s.heads, s.head_dim}, g);
      t.set_requires_grad(true);
      return t;
    };
    Tensor q = leaf(), k = leaf(), v = leaf();
    const AttentionPattern pat{s.window, s.stride};
    const Timing fwd = time_cpu([&] {
      NoGradGuard ng;
      (void)sparse_attention(q, k, v, pat, 0.125);
    });
    const Timing both = time_cpu([&] {
      Tensor o = sparse_attention(q, k, v, pat, 0.125);
      o.backward(ones_like(o));
    });
    // Useful work: 4 * dh FLOPs per visible (query, key) pair forward (QK^T and PV), 2.5x that
    // backward.
    double pairs = 0;
    for (int64_t t = 0; t < s.len; ++t) {
      const bool global_q = s.stride > 0 && t % s.stride == 0;
      if (s.window <= 0 || global_q || t < s.window) {
        pairs += double(t + 1);
      } else {
        // The global keys before the window: a whole count of them.
        const int64_t globals = s.stride > 0 ? (t - s.window) / s.stride + 1 : 0;
        pairs += double(s.window) + double(globals);
      }
    }
    pairs *= double(s.batch * s.heads);
    const double flops = 4.0 * double(s.head_dim) * pairs;
    std::printf("%-34s %5ld %5ld %3ld %4ld %9.2f %10.2f %9.2f %9.2f\n", s.what, long(s.batch),
                long(s.len), long(s.heads), long(s.head_dim), fwd.median_ms, both.median_ms,
                flops / fwd.median_ms / 1e6, 3.5 * flops / both.median_ms / 1e6);
    report.add({"attention",
                {{"shape", s.what}},
                {{"batch", double(s.batch)},
                 {"len", double(s.len)},
                 {"heads", double(s.heads)},
                 {"head_dim", double(s.head_dim)},
                 {"fwd_ms", fwd.median_ms},
                 {"fwd_bwd_ms", both.median_ms},
                 {"visible_pairs", pairs}}});
  }
}

// A checkpoint's writer on one thread: the checksums (CRC32C, the instruction and the table) and an
// HDF5 write of the same bytes, in GB/s. A rank file is written at about the slower of the two.
void bench_checkpoint(Report& report, bool quick) {
  const std::size_t bytes = (quick ? std::size_t{64} : std::size_t{512}) << 20;
  std::vector<unsigned char> buf(bytes);
  for (std::size_t i = 0; i < bytes; ++i)
    buf[i] = static_cast<unsigned char>(i * 2654435761u >> 13);
  std::printf("\n%-34s %10s %10s\n", "checkpoint writer (one thread)", "MB", "GB/s");
  const auto row = [&](const char* what, const std::function<void()>& fn) {
    const Timing t = time_cpu(fn, 5, 1);
    const double gbs = double(bytes) / t.median_ms / 1e6;
    std::printf("%-34s %10.0f %10.2f\n", what, double(bytes) / 1e6, gbs);
    report.add({"checkpoint", {{"what", what}}, {{"bytes", double(bytes)}, {"gb_per_s", gbs}}});
  };
  uint32_t sink = 0;
  row("crc32c (the CPU's instruction)", [&] { sink ^= trainer::crc32c(buf.data(), bytes); });
  row("crc32c (table)", [&] { sink ^= trainer::crc32c_table(buf.data(), bytes); });
  const std::string path = "/tmp/hydra_bench_checkpoint_" + std::to_string(::getpid()) + ".h5";
  row("HDF5 write (page cache)", [&] {
    auto f = data::Hdf5File::create(path);
    HYDRA_CHECK(f.ok()) << f.status().message();
    HYDRA_CHECK(f->write("x", data::Hdf5Type::kU32, {int64_t(bytes / 4)}, buf.data()).ok());
    HYDRA_CHECK(f->flush().ok());
  });
  std::remove(path.c_str());
  if (sink == 1) std::printf(" \n");  // keeps the checksums from being optimised away
}

// The host's work of a statistics step for one MoE layer (ChunkMoE's statistics, run from
// ForwardContext::finish_stats once the router's values are on the host): the toy's routing (8
// experts, chunks of 8 tokens, at most 2 active, BlockFFN's objective) over 32,768 tokens, as at
// seq 8192 x batch 4. The model width does not enter the statistics; a narrow one keeps the forward
// short. A toy step runs 8 such layers.
void bench_stats(Report& report, bool quick) {
  const int64_t B = quick ? 1 : 4, L = 8192, d = 16;
  config::RunConfig cfg;
  const Status st = config::parse_text(
      "model { vocab_size: 64 d_model: 16 num_blocks: 1 max_seq_len: 8192 "
      "moe { num_experts: 8 d_expert: 16 max_active: 2 chunk: 8 objective: BLOCKFFN } }",
      "hydra-bench", &cfg);
  HYDRA_CHECK(st.ok()) << st.message();
  auto spec = model::make_spec(cfg.model(), "hydra-bench");
  HYDRA_CHECK(spec.ok()) << spec.status().message();
  model::Init init(7);
  model::ChunkMoE moe(init, *spec, 0);
  Generator g(8);
  const Tensor x = randn({B, L, d}, g);
  NoGradGuard ng;
  std::printf("\n%-34s %10s %10s %12s\n", "MoE statistics (host)", "tokens", "ms", "ns/token");
  // One forward queues the statistics (defer_stats); each repeat runs them from the same host
  // copies.
  model::ForwardContext ctx;
  ctx.defer_stats = true;
  (void)moe.forward(x, ctx, nullptr);
  const std::vector<model::ForwardContext::PendingStat> queued = ctx.pending_stats;
  HYDRA_CHECK(!queued.empty()) << "hydra-bench: the MoE queued no statistics";
  std::vector<double> ms;
  const char* reps_env = std::getenv("HYDRA_BENCH_STATS_REPEATS");  // more, for a profiler
  const int reps = std::max(1, reps_env ? std::atoi(reps_env) : quick ? 5 : 21);
  for (int rep = 0; rep < reps + 2; ++rep) {
    ctx.pending_stats = queued;
    ctx.stats.clear();
    const auto t0 = std::chrono::steady_clock::now();
    ctx.finish_stats();
    const double t =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (rep >= 2) ms.push_back(t);  // two warm-up runs
    HYDRA_CHECK(ctx.stats.count("moe.0.tls")) << "hydra-bench: no MoE statistics recorded";
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2], tokens = double(B * L);
  std::printf("%-34s %10.0f %10.3f %12.1f\n", "one layer's statistics", tokens, med,
              med * 1e6 / tokens);
  report.add({"stats", {{"what", "moe layer statistics"}}, {{"tokens", tokens}, {"ms", med}}});
}

int run(int argc, char** argv) {
  std::string json, only;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      json = argv[++i];
    } else if (a == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (a == "--quick") {
      quick = true;
    } else {
      std::cerr
          << "usage: hydra-bench [--json FILE] [--only matmul|scan|attention|checkpoint|stats] "
             "[--quick]\n";
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  std::printf("hydra-bench: %d threads, %u hardware threads, host %s\n", num_threads(),
              std::thread::hardware_concurrency(), host);
  Report report;
  if (only.empty() || only == "matmul") bench_matmul(report, quick);
  if (only.empty() || only == "scan") bench_scan(report, quick);
  if (only.empty() || only == "attention") bench_attention(report, quick);
  if (only.empty() || only == "checkpoint") bench_checkpoint(report, quick);
  if (only.empty() || only == "stats") bench_stats(report, quick);
  if (!json.empty()) {
    report.write_json(json, {{"threads", std::to_string(num_threads())}, {"host", host}});
    std::printf("\nwrote %s\n", json.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace hydra::bench

int main(int argc, char** argv) { return hydra::bench::run(argc, argv); }
