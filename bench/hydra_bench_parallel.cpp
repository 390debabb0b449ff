// hydra-bench-parallel: the communication of data and expert parallelism at hydra-1.6b shapes, run
// under mpirun (one rank per GPU with --gpu: NCCL over CUDA tensors; without: MPI over CPU
// tensors).
//   1. all-to-all: the communicator's all-to-all-v with equal counts (grouped ncclSend/ncclRecv, as
//      NCCL's own all-to-all) at 16, 64, 128 and 256 MiB sent per rank: the reference
//      (bench/nccl_reference.py times NCCL's all-to-all through PyTorch at the same sizes).
//   2. expert dispatch + combine: the exchange the MoE layer runs (parallel/experts.h: sizes
//   exchange,
//      all-to-all-v of the chunk rows, reorder, and back), forward and forward + backward, at the
//      1.6B model's MoE shapes (d 2048, 8 experts, 2 active per chunk of 8 tokens, random routing),
//      in f32 (256 MiB per rank each way) and bf16 (128 MiB, as BF16_MIXED training sends), with
//      the plain all-to-all-v at the same uneven counts, one way, and at equal counts beside it.
//   3. data-parallel all-reduce overlap: the backward of a 1.6B-parameter stack of linear layers
//      alone, with the gradient reducer (buckets all-reduced from gradient-ready hooks during the
//      backward), and with one all-reduce per gradient after the backward: the exposed
//      communication time is (reducer - alone); the communication time is (after - alone). ZeRO-1
//      beside it: the backward with buckets reduce-scattered from the hooks, and the all-gather of
//      the parameters after the optimizer step (the all-reduce's two halves, the second not
//      overlapped).
// Bus bandwidth follows nccl-tests: all-to-all busbw = bytes sent per rank / time * (n - 1) / n;
// all-reduce busbw = bytes / time * 2 (n - 1) / n. Times: medians over repeats after warm-up, CUDA
// events on the compute stream (GPU) or the wall clock (CPU), every repeat started after a barrier.
//   mpirun -np 2 hydra-bench-parallel [--gpu] [--quick] [--json FILE] [--layers N] [--tokens N]
//   [--only PART]
//   (--layers / --tokens: the all-reduce stack's depth and tokens per rank; defaults 48 and 2048;
//   --only all-to-all | experts | all-reduce: that part alone)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "autograd/cuda_context.h"
#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "bench/bench_util.h"
#include "parallel/experts.h"
#include "parallel/reducer.h"
#include "parallel/runtime.h"

namespace hydra::bench {
namespace {

struct Env {
  parallel::Communicator* world = nullptr;
  Device dev;
  bool gpu = false;
  int reps = 10;
};

// Median milliseconds of fn on this rank; every repeat starts after a barrier.
double time_ms(const Env& env, const std::function<void()>& fn, int warmup = 2) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < env.reps; ++i) {
    env.world->barrier();
    if (env.gpu) {
      void* stream = cuda_compute_stream(env.dev.index);
      CudaEvent a, b;
      a.record(stream);
      fn();
      b.record(stream);
      b.synchronize();
      ms.push_back(b.ms_since(a));
    } else {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  std::sort(ms.begin(), ms.end());
  // The slowest rank's median: the step waits for it.
  return env.world->all_reduce_host(ms[ms.size() / 2], parallel::ReduceOp::kMax);
}

Tensor random_rows(const Env& env, int64_t rows, int64_t d, uint64_t seed) {
  Generator g(seed + 1000 * static_cast<uint64_t>(env.world->rank()));
  return randn({rows, d}, g, 0, 1, DType::kF32, env.dev);
}

void print_row(const Row& r) {
  std::printf("%-58s", r.bench.c_str());
  for (const auto& [k, v] : r.values) std::printf("  %s %.4g", k.c_str(), v);
  std::printf("\n");
}

void add(Report& report, Row row) {
  if (parallel::process_info().rank == 0) print_row(row);
  report.add(std::move(row));
}

double a2a_busbw(double bytes, double ms, int n) { return bytes / (ms * 1e-3) * (n - 1) / n / 1e9; }

void bench_all_to_all(const Env& env, Report& report, const std::vector<int64_t>& mib) {
  const int n = env.world->size();
  const int64_t d = 2048;
  for (const int64_t m : mib) {
    const int64_t rows = (m << 20) / (d * 4) / n * n;
    const Tensor send = random_rows(env, rows, d, 1),
                 recv = Tensor::empty({rows, d}, DType::kF32, env.dev);
    const std::vector<int64_t> counts(n, rows / n);
    const double ms = time_ms(env, [&] { env.world->all_to_all_v(send, counts, recv, counts); });
    const double bytes = double(rows) * d * 4;
    add(report, {"all_to_all_v equal counts " + std::to_string(m) + " MiB/rank",
                 {},
                 {{"ms", ms}, {"busbw_GBps", a2a_busbw(bytes, ms, n)}}});
  }
}

// Random chunk routing: each chunk of `chunk` tokens picks `active` distinct experts of E.
std::vector<int64_t> route_sizes(int64_t chunks, int64_t chunk, int64_t E, int64_t active,
                                 uint64_t seed) {
  Generator g(seed);
  const std::vector<int64_t> pick =
      randint(0, 1 << 30, {chunks, active}, g, DType::kI64).to_vector<int64_t>();
  std::vector<int64_t> sizes(E, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    std::vector<int64_t> chosen;
    for (int64_t a = 0; a < active; ++a) {
      int64_t e = pick[c * active + a] % E;
      while (std::find(chosen.begin(), chosen.end(), e) != chosen.end()) e = (e + 1) % E;
      chosen.push_back(e);
      sizes[e] += chunk;
    }
  }
  return sizes;
}

void bench_expert_exchange(const Env& env, Report& report, int64_t tokens, DType dt) {
  const int n = env.world->size();
  const int64_t d = 2048, E = 8, active = 2, chunk = 8;
  if (E % n != 0) {
    if (env.world->rank() == 0)
      std::printf("expert exchange: %lld experts do not split over %d ranks; skipped\n",
                  (long long)E, n);
    return;
  }
  const std::vector<int64_t> sizes =
      route_sizes(tokens / chunk, chunk, E, active, 7 + env.world->rank());
  int64_t rows = 0;
  for (int64_t s : sizes) rows += s;
  Tensor xs = random_rows(env, rows, d, 2).to(dt);
  const double bytes = double(rows) * d * double(dtype_size(dt));  // sent per rank, each way
  const std::string shape =
      "[" + std::to_string(rows) + " x " + std::to_string(d) + "] " + std::string(dtype_name(dt));
  {
    NoGradGuard ng;
    const double ms = time_ms(env, [&] {
      const parallel::ExpertDispatch disp =
          parallel::dispatch_to_experts(xs, sizes, E / n, *env.world);
      (void)parallel::combine_from_experts(disp.rows, disp, *env.world);
    });
    add(report, {"expert dispatch+combine fwd " + shape,
                 {},
                 {{"ms", ms}, {"busbw_GBps", a2a_busbw(2 * bytes, ms, n)}}});
  }
  {
    xs.set_requires_grad(true);
    const Tensor g = random_rows(env, rows, d, 3).to(dt);
    const double ms = time_ms(env, [&] {
      xs.set_grad(Tensor());
      const parallel::ExpertDispatch disp =
          parallel::dispatch_to_experts(xs, sizes, E / n, *env.world);
      parallel::combine_from_experts(disp.rows, disp, *env.world).backward(g);
    });
    add(report, {"expert dispatch+combine fwd+bwd " + shape,
                 {},
                 {{"ms", ms}, {"busbw_GBps", a2a_busbw(4 * bytes, ms, n)}}});
    xs.set_requires_grad(false);
  }
  {
    // The same uneven counts through the plain all-to-all-v (no sizes exchange, no reorder).
    std::vector<int64_t> send_counts(n, 0);
    for (int64_t e = 0; e < E; ++e) send_counts[e / (E / n)] += sizes[e];
    Tensor sc = tensor(send_counts, {n}).to(env.dev),
           rcv = Tensor::empty({n}, DType::kI64, env.dev);
    env.world->all_to_all_v(sc, std::vector<int64_t>(n, 1), rcv, std::vector<int64_t>(n, 1));
    const std::vector<int64_t> recv_counts = rcv.cpu().to_vector<int64_t>();
    int64_t rrows = 0;
    for (int64_t c : recv_counts) rrows += c;
    Tensor recv = Tensor::empty({rrows, d}, dt, env.dev);
    Tensor back = Tensor::empty({rows, d}, dt, env.dev);
    const double ms = time_ms(env, [&] {
      env.world->all_to_all_v(xs, send_counts, recv, recv_counts);
      env.world->all_to_all_v(recv, recv_counts, back, send_counts);
    });
    add(report, {"plain all_to_all_v there and back, same counts " + shape,
                 {},
                 {{"ms", ms}, {"busbw_GBps", a2a_busbw(2 * bytes, ms, n)}}});
    const double one_way =
        time_ms(env, [&] { env.world->all_to_all_v(xs, send_counts, recv, recv_counts); });
    // The rows this rank keeps and sends on: routing decides how many leave the GPU.
    std::string split;
    for (int p = 0; p < n; ++p) {
      if (p > 0) split += '/';
      split += std::to_string(send_counts[p]);
    }
    add(report,
        {"plain all_to_all_v one way, same counts (rank 0 sends " + split + " rows) " + shape,
         {},
         {{"ms", one_way}, {"busbw_GBps", a2a_busbw(bytes, one_way, n)}}});
    const std::vector<int64_t> equal(n, rows / n);
    Tensor eq_recv = Tensor::empty({rows / n * n, d}, dt, env.dev);
    const Tensor eq_send = xs.narrow(0, 0, rows / n * n);
    const double eq_ms = time_ms(env, [&] {
      env.world->all_to_all_v(eq_send, equal, eq_recv, equal);
      env.world->all_to_all_v(eq_recv, equal, eq_send, equal);
    });
    add(report, {"plain all_to_all_v there and back, equal counts " + shape,
                 {},
                 {{"ms", eq_ms}, {"busbw_GBps", a2a_busbw(2 * bytes, eq_ms, n)}}});
  }
}

// A benchmark script (about 180 lines): each measurement is set up where it is timed, in the order
// the report prints them, so that a row and its code read side by side.
void bench_allreduce_overlap(const Env& env, Report& report, int64_t layers, int64_t tokens) {
  const int n = env.world->size();
  const int64_t d = 2048, ff = 8192;
  std::vector<Tensor> weights;
  for (int64_t l = 0; l < layers; ++l) {
    for (const auto& s : {Shape{ff, d}, Shape{d, ff}}) {
      Generator g(100 + weights.size());
      Tensor w = randn(s, g, 0, 0.02, DType::kF32, env.dev);
      w.set_requires_grad(true);
      weights.push_back(w);
    }
  }
  const Tensor x = random_rows(env, tokens, d, 4), gy = random_rows(env, tokens, d, 5);
  double params = 0;
  for (const Tensor& w : weights) params += double(w.numel());
  // Each step starts without gradients (the trainer's zero_grad), so that a reducer's prepare() can
  // hand every weight's gradient its place in a bucket.
  auto clear = [&] {
    for (Tensor& w : weights) w.set_grad(Tensor());
  };
  auto forward_backward = [&] {
    Tensor h = x;
    for (int64_t l = 0; l < layers; ++l)
      h = add(h, linear(relu(linear(h, weights[2 * l])), weights[2 * l + 1]));
    h.backward(gy);
  };
  auto backward = [&] {
    clear();
    forward_backward();
  };
  // cudaMalloc calls and cache flushes of the caching allocator during a timed mode (steady state:
  // 0).
  auto driver = [&] {
    if (!env.gpu) return std::pair<double, double>{0, 0};
    const CudaMemoryStats m = cuda_memory_stats(env.dev.index);
    return std::pair<double, double>{double(m.num_driver_allocations), double(m.num_cache_flushes)};
  };
  auto d0 = driver();
  const double alone = time_ms(env, backward, 1);
  auto d1 = driver();
  add(report, {"backward alone (allocator)",
               {},
               {{"driver_allocs", d1.first - d0.first}, {"cache_flushes", d1.second - d0.second}}});
  // The copy the reducer adds (each gradient into its bucket), without communication.
  const double copied = time_ms(
      env,
      [&] {
        backward();
        NoGradGuard ng;
        for (Tensor& w : weights) (void)w.grad().clone();
      },
      1);
  // The backward writing each weight's gradient into a destination of its own (as into a bucket),
  // without a reducer: separates the GEMMs' cost from the reducer's bookkeeping.
  double into_dest = 0;
  {
    std::vector<Tensor> dests;
    dests.reserve(weights.size());
    for (const Tensor& w : weights) dests.push_back(Tensor::empty(w.shape(), w.dtype(), env.dev));
    into_dest = time_ms(
        env,
        [&] {
          for (std::size_t i = 0; i < weights.size(); ++i)
            weights[i].set_grad_destination(dests[i]);
          backward();
        },
        1);
    for (Tensor& w : weights) w.set_grad_destination(Tensor());
  }
  std::vector<parallel::ReducedParam> rp;
  for (std::size_t i = 0; i < weights.size(); ++i)
    rp.push_back({std::string("w").append(std::to_string(i)), weights[i], env.world, false});
  double with_reducer = 0;
  int64_t buckets = 0, early = 0, copied_grads = 0;
  double reducer_exposed =
      0;  // the reducer's own reading (the trainer's comm.exposed_ms), last repeat
  {
    parallel::GradientReducer reducer(rp, 25.0);
    d0 = driver();
    with_reducer = time_ms(
        env,
        [&] {
          clear();
          reducer.prepare();
          forward_backward();
          reducer.finish();
        },
        1);
    d1 = driver();
    add(report,
        {"backward + reducer (allocator)",
         {},
         {{"driver_allocs", d1.first - d0.first}, {"cache_flushes", d1.second - d0.second}}});
    buckets = reducer.stats().buckets;
    early = reducer.stats().early;
    copied_grads = reducer.stats().copied;
    reducer_exposed = reducer.stats().exposed_ms;
    if (env.gpu) {
      // Where the reducer's time goes: device time between events recorded after prepare() and
      // after the backward's last kernel was queued (medians over the repeats).
      std::vector<double> ph[3];
      void* stream = cuda_compute_stream(env.dev.index);
      for (int i = 0; i < env.reps; ++i) {
        env.world->barrier();
        CudaEvent e0, e1, e2, e3;
        clear();
        e0.record(stream);
        reducer.prepare();
        e1.record(stream);
        forward_backward();
        e2.record(stream);
        reducer.finish();
        e3.record(stream);
        e3.synchronize();
        ph[0].push_back(e1.ms_since(e0));
        ph[1].push_back(e2.ms_since(e1));
        ph[2].push_back(e3.ms_since(e2));
      }
      for (auto& v : ph) std::sort(v.begin(), v.end());
      const std::size_t m = ph[0].size() / 2;
      add(report,
          {"backward + reducer, phases (device time)",
           {},
           {{"prepare_ms", ph[0][m]}, {"forward_backward_ms", ph[1][m]}, {"finish_ms", ph[2][m]}}});
    }
  }
  // ZeRO-1: buckets reduce-scattered during the backward, then the updated parameters all-gathered.
  double with_zero = 0, gather = 0;
  {
    parallel::GradientReducer zero(rp, 25.0, /*shard=*/true);
    with_zero = time_ms(
        env,
        [&] {
          clear();
          zero.prepare();
          forward_backward();
          zero.finish();
        },
        1);
    gather = time_ms(env, [&] { zero.all_gather_params(); });
  }
  const double after = time_ms(
      env,
      [&] {
        backward();
        for (Tensor& w : weights) env.world->all_reduce(w.grad(), parallel::ReduceOp::kSum);
      },
      1);
  const double bytes = params * 4, comm = after - alone, exposed = with_reducer - alone;
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "%lld x (2048x8192, 8192x2048) f32, %.0fM params, %lld tokens/rank",
                (long long)layers, params / 1e6, (long long)tokens);
  const std::string shape = buf;
  add(report, {"backward alone " + shape, {}, {{"ms", alone}}});
  add(report, {"backward + a copy of every gradient (no communication) " + shape,
               {},
               {{"ms", copied}, {"copy_ms", copied - alone}}});
  add(report, {"backward, gradients written into set destinations (no reducer) " + shape,
               {},
               {{"ms", into_dest}, {"over_alone_ms", into_dest - alone}}});
  add(report, {"backward + reducer (25 MB buckets, overlapped) " + shape,
               {},
               {{"ms", with_reducer},
                {"exposed_ms", exposed},
                {"buckets", double(buckets)},
                {"early_buckets", double(early)},
                {"copied_grads", double(copied_grads)},
                {"metric_exposed_ms", reducer_exposed}}});
  add(report, {"ZeRO-1: backward + reduce-scatter (25 MB buckets, overlapped) " + shape,
               {},
               {{"ms", with_zero}, {"exposed_ms", with_zero - alone}}});
  add(report, {"ZeRO-1: all-gather of the updated parameters " + shape,
               {},
               {{"ms", gather},
                {"allgather_busbw_GBps", bytes / (gather * 1e-3) * (n - 1) / n / 1e9},
                {"step_exposed_ms", with_zero - alone + gather},
                {"adam_state_MiB_per_rank", params * 8 / n / (1 << 20)}}});
  add(report, {"backward then all-reduce every gradient " + shape,
               {},
               {{"ms", after},
                {"comm_ms", comm},
                {"allreduce_busbw_GBps", bytes / (comm * 1e-3) * 2 * (n - 1) / n / 1e9},
                {"hidden_fraction", comm > 0 ? 1 - exposed / comm : 0}}});
}

int run(int argc, char** argv) {
  const auto& info = parallel::init_processes(&argc, &argv, /*force=*/true);
  bool gpu = false, quick = false;
  int64_t layers = 0, tokens = 0;  // 0: the defaults below
  std::string json, only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--gpu") {
      gpu = true;
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--json" && i + 1 < argc) {
      json = argv[++i];
    } else if (a == "--layers" && i + 1 < argc) {
      layers = std::atoll(argv[++i]);
    } else if (a == "--tokens" && i + 1 < argc) {
      tokens = std::atoll(argv[++i]);
    } else if (a == "--only" && i + 1 < argc &&
               (std::string(argv[i + 1]) == "all-to-all" || std::string(argv[i + 1]) == "experts" ||
                std::string(argv[i + 1]) == "all-reduce")) {
      only = argv[++i];
    } else {
      if (info.rank == 0)
        std::fprintf(stderr,
                     "hydra-bench-parallel: unknown argument '%s'\nusage: mpirun -np N "
                     "hydra-bench-parallel [--gpu] [--quick] [--json FILE] [--layers N] [--tokens "
                     "N] [--only all-to-all|experts|all-reduce]\n",
                     a.c_str());
      parallel::finalize_processes();
      return 2;
    }
  }
  if (gpu && !cuda_available()) {
    if (info.rank == 0)
      std::fprintf(stderr, "hydra-bench-parallel: --gpu needs a CUDA build and a GPU per rank\n");
    parallel::finalize_processes();
    return 2;
  }
  {
    auto world = parallel::world_communicator(gpu);
    Env env{world.get(), world->device(), gpu, quick ? 3 : 10};
    if (info.rank == 0)
      std::printf("hydra-bench-parallel: %d ranks, %s\n", world->size(),
                  gpu ? ("NCCL " + parallel::nccl_version() + " over CUDA tensors").c_str()
                      : "MPI over CPU tensors");
    Report report;
    if (only.empty() || only == "all-to-all")
      bench_all_to_all(env, report,
                       quick ? std::vector<int64_t>{1, 4} : std::vector<int64_t>{16, 64, 128, 256});
    // 1.6B "experts" stage: 16 sequences of 2048 tokens per rank would be 32768; 16384 keeps f32 at
    // 256 MiB sent per rank each way (2 active experts per chunk).
    // f32, and bf16 as BF16_MIXED training sends (half the bytes).
    if (only.empty() || only == "experts")
      for (const DType dt : {DType::kF32, DType::kBF16})
        bench_expert_exchange(env, report, quick ? 512 : 16384, dt);
    if (only.empty() || only == "all-reduce")
      bench_allreduce_overlap(env, report,
                              layers > 0 ? layers
                              : quick    ? 2
                                         : 48,
                              tokens > 0 ? tokens
                              : quick    ? 64
                                         : 2048);
    if (!json.empty() && info.rank == 0) {
      report.write_json(json, {{"ranks", std::to_string(world->size())},
                               {"backend", gpu ? "nccl " + parallel::nccl_version() : "mpi"}});
      std::printf("wrote %s\n", json.c_str());
    }
    world->barrier();
  }
  parallel::finalize_processes();
  return 0;
}

}  // namespace
}  // namespace hydra::bench

int main(int argc, char** argv) { return hydra::bench::run(argc, argv); }
