#include "parallel/grid.h"

#include "autograd/ops.h"

namespace hydra::parallel {
namespace {

// One element to and from every peer, so that the point-to-point connections exist before the first
// step: NCCL makes them on first use, blocking the host in that call until the peer makes its side,
// and the ranks issue work on several communicators in orders that may differ between them.
void connect_peers(Communicator& c) {
  if (c.size() == 1) return;
  const int n = c.size();
  const std::vector<int64_t> ones(n, 1);
  const Tensor send = zeros({n}, DType::kF32, c.device()),
               recv = zeros({n}, DType::kF32, c.device());
  c.all_to_all_v(send, ones, recv, ones);
  c.synchronize();
}

}  // namespace

std::string GridShape::str() const {
  return "dp=" + std::to_string(dp) + " ep=" + std::to_string(ep) + " sp=" + std::to_string(sp);
}

Expected<std::unique_ptr<ProcessGrid>> ProcessGrid::create(std::unique_ptr<Communicator> world,
                                                           const GridShape& shape,
                                                           const std::string& source) {
  if (shape.dp < 1 || shape.ep < 1 || shape.sp < 1)
    return invalid_argument(source + ": parallel { " + shape.str() + " }: every size must be >= 1");
  if (shape.size() != world->size())
    return invalid_argument(source + ": parallel { " + shape.str() + " } needs dp * ep * sp = " +
                            std::to_string(shape.size()) + " processes, but the job has " +
                            std::to_string(world->size()) + " (start it with mpirun -np " +
                            std::to_string(shape.size()) + " or change parallel.dp / ep / sp)");
  std::unique_ptr<ProcessGrid> g(new ProcessGrid());
  g->shape_ = shape;
  const int64_t r = world->rank();
  g->sp_rank_ = r % shape.sp;
  g->ep_rank_ = (r / shape.sp) % shape.ep;
  g->dp_rank_ = r / (shape.sp * shape.ep);
  const int key = static_cast<int>(r);
  g->sp_ = world->split(static_cast<int>(g->dp_rank_ * shape.ep + g->ep_rank_), key, "sp");
  g->ep_ = world->split(static_cast<int>(g->dp_rank_ * shape.sp + g->sp_rank_), key, "ep");
  g->expert_ = world->split(static_cast<int>(g->ep_rank_), key, "expert");
  // The communicators that exchange point to point: the sequence's neighbours, the experts'
  // all-to-all.
  connect_peers(*g->sp_);
  connect_peers(*g->ep_);
  g->world_ = std::move(world);
  return g;
}

std::unique_ptr<ProcessGrid> ProcessGrid::single(Device device) {
  std::unique_ptr<ProcessGrid> g(new ProcessGrid());
  g->world_ = std::make_unique<SelfCommunicator>("world", device);
  g->sp_ = std::make_unique<SelfCommunicator>("sp", device);
  g->ep_ = std::make_unique<SelfCommunicator>("ep", device);
  g->expert_ = std::make_unique<SelfCommunicator>("expert", device);
  return g;
}

}  // namespace hydra::parallel
