#include "parallel/runtime.h"

#include <mpi.h>

#include <cstdlib>
#include <iostream>
#include <mutex>

#include "autograd/cuda_context.h"
#include "base/check.h"
#include "parallel/mpi_communicator.h"
#include "parallel/staged_communicator.h"
#if HYDRA_WITH_CUDA
#include "parallel/nccl_communicator.h"
#endif

namespace hydra::parallel {
namespace {

ProcessInfo g_info;
bool g_initialized = false;
bool g_started_mpi = false;
std::mutex g_mu;

bool env_set(const char* name) { return std::getenv(name) != nullptr; }

}  // namespace

const ProcessInfo& init_processes(int* argc, char*** argv, bool force) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_initialized) return g_info;
  g_initialized = true;
  const bool by_mpirun =
      env_set("OMPI_COMM_WORLD_SIZE") || env_set("PMI_SIZE") || env_set("PMIX_RANK");
  if (!by_mpirun && !force) return g_info;
  int already = 0;
  MPI_Initialized(&already);
  if (!already) {
    int provided = 0;
    const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    if (rc != MPI_SUCCESS) {
      std::cerr << "error: MPI_Init_thread failed (code " << rc
                << "); was the job started with mpirun or srun?\n";
      std::exit(1);
    }
    g_started_mpi = true;
    g_info.threads_provided = provided;
  } else {
    MPI_Query_thread(&g_info.threads_provided);
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_info.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_info.size);
  MPI_Comm local = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_info.rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &g_info.local_rank);
  MPI_Comm_size(local, &g_info.local_size);
  MPI_Allreduce(&g_info.rank, &g_info.host_first, 1, MPI_INT, MPI_MIN, local);
  MPI_Allreduce(&g_info.rank, &g_info.host_last, 1, MPI_INT, MPI_MAX, local);
  MPI_Comm_free(&local);
  g_info.distributed = true;
  g_info.launcher = env_set("SLURM_PROCID") && !env_set("OMPI_COMM_WORLD_SIZE") ? "srun" : "mpirun";
  return g_info;
}

const ProcessInfo& process_info() { return g_info; }

void finalize_processes() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_started_mpi) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
  g_started_mpi = false;
}

std::unique_ptr<Communicator> world_communicator(bool gpu, CommBackend backend) {
  HYDRA_CHECK(gpu || backend != CommBackend::kNccl)
      << "parallel.comm = NCCL moves CUDA tensors; with train.device = cpu use parallel.comm = MPI "
         "(or AUTO)";
  const Device dev = gpu ? Device::cuda(device_for_rank()) : Device::cpu();
  if (!g_info.distributed) return std::make_unique<SelfCommunicator>("world", dev);
  if (gpu && backend != CommBackend::kMpi) {
    // NCCL refuses two ranks of one communicator on one GPU; say so before it does, and what to do.
    const std::string problem = nccl_placement_problem();
    HYDRA_CHECK(problem.empty()) << "rank " << g_info.rank << ": " << problem;
  }
  MPI_Comm dup = MPI_COMM_NULL;
  HYDRA_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup) == MPI_SUCCESS)
      << "rank " << g_info.rank << ": MPI_Comm_dup failed";
  auto mpi = std::make_unique<MpiCommunicator>(dup, "world");
  // The trainer sets parallel.timeout_s; HYDRA_COMM_TIMEOUT_S sets it for tests and tools.
  if (const char* env = std::getenv("HYDRA_COMM_TIMEOUT_S"); env != nullptr && std::atoi(env) > 0)
    mpi->set_timeout(std::chrono::seconds(std::atoi(env)));
  if (!gpu) return mpi;
  if (backend == CommBackend::kMpi)
    return std::make_unique<HostStagedCommunicator>(std::move(mpi), dev);
#if HYDRA_WITH_CUDA
  // NCCL connects the collectives' rings and trees on first use by default, blocking the host in
  // that call until the peers make theirs. Ranks issue work on several communicators in orders that
  // may differ (a bucket's all-reduce from a gradient hook beside a sequence-parallel exchange), so
  // they could wait for one another there: connect when each communicator is created instead. A
  // value the user set wins. (Point-to-point connections: ProcessGrid::create makes them.)
  setenv("NCCL_RUNTIME_CONNECT", "0", /*overwrite=*/0);
  return std::make_unique<NcclCommunicator>(std::move(mpi), dev.index);
#else
  HYDRA_FAIL() << "this build has no CUDA backend: no NCCL communicator";
#endif
}

void abort_job(int code, const std::string& message) {
  std::cerr << (g_info.distributed ? "rank " + std::to_string(g_info.rank) + ": " : std::string())
            << message << std::endl;
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  if (up && !down && g_info.size > 1) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

std::string nccl_placement_problem() {
  const int gpus = cuda_available() ? cuda_device_count() : 0;
  if (!g_info.distributed || g_info.local_size <= gpus) return "";
  return std::to_string(g_info.local_size) + " ranks on this host but " + std::to_string(gpus) +
         " GPU(s) visible; NCCL needs one GPU per rank: start at most " + std::to_string(gpus) +
         " ranks per host (mpirun --map-by ppr:" + std::to_string(gpus) +
         ":node, srun --ntasks-per-node), or set parallel.comm = MPI to stage GPU tensors through "
         "host memory "
         "(slow: for tests and debugging)";
}

std::string nccl_version() {
#if HYDRA_WITH_CUDA
  return NcclCommunicator::library_version();
#else
  return "";
#endif
}

int device_for_rank() {
  const int n = cuda_available() ? cuda_device_count() : 0;
  HYDRA_CHECK(n > 0) << "rank " << g_info.rank << ": no CUDA device visible";
  return g_info.local_rank % n;
}

}  // namespace hydra::parallel
