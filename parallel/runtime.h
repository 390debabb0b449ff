// The processes of a job: MPI start-up when launched by mpirun or srun, rank / local rank / device
// discovery, the world communicator, and taking the whole job down on an error (no silent hang).
#pragma once

#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace hydra::parallel {

struct ProcessInfo {
  int rank = 0, size = 1;              // in the world
  int local_rank = 0, local_size = 1;  // on this host
  // The lowest and highest world rank on this host (rank placement: a group of consecutive ranks
  // stays inside the host when it lies within [host_first, host_last] and the host's ranks are
  // consecutive, host_last - host_first + 1 == local_size).
  int host_first = 0, host_last = 0;
  bool distributed = false;         // MPI is up (launched by mpirun / srun, or forced)
  std::string launcher = "single";  // "mpirun", "srun", "single"
  int threads_provided = 0;         // MPI thread support level granted
};

// Starts MPI (thread level MULTIPLE) when the environment shows an mpirun or srun launch, or when
// `force` (tests). Safe to call more than once; the first call decides.
const ProcessInfo& init_processes(int* argc, char*** argv, bool force = false);
const ProcessInfo& process_info();
// Finalizes MPI when init_processes started it (at exit of main).
void finalize_processes();

// How CUDA tensors travel between ranks: NCCL (one GPU per rank), or MPI with the tensors staged
// through host memory (parallel/staged_communicator.h: slow, but ranks may share a GPU). kAuto:
// NCCL for CUDA tensors. CPU tensors always travel over MPI.
enum class CommBackend { kAuto, kNccl, kMpi };

// The world: an MPI communicator of all ranks, or a SelfCommunicator in a single process. `gpu`:
// its tensors live on this rank's CUDA device, and travel as `backend` says.
std::unique_ptr<Communicator> world_communicator(bool gpu = false,
                                                 CommBackend backend = CommBackend::kAuto);

// Prints "rank R: message" to stderr and ends every rank of the job (MPI_Abort) with `code`; in a
// single process, exits with `code`.
[[noreturn]] void abort_job(int code, const std::string& message);

// Why NCCL cannot run this job's ranks (more ranks on this host than visible GPUs), with what to do
// about it; empty when it can.
std::string nccl_placement_problem();

// The NCCL library this build loads ("2.21.5"), or "" in a build without CUDA.
std::string nccl_version();

// The CUDA device this rank should use: local_rank modulo the visible devices (one GPU per rank).
int device_for_rank();

}  // namespace hydra::parallel
