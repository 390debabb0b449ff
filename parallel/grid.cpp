#include "parallel/grid.h"

namespace hydra::parallel {

std::string GridShape::str() const {
  return "dp=" + std::to_string(dp) + " ep=" + std::to_string(ep) + " sp=" + std::to_string(sp);
}

Expected<std::unique_ptr<ProcessGrid>> ProcessGrid::create(std::unique_ptr<Communicator> world, const GridShape& shape,
                                                           const std::string& source) {
  if (shape.dp < 1 || shape.ep < 1 || shape.sp < 1)
    return invalid_argument(source + ": parallel { " + shape.str() + " }: every size must be >= 1");
  if (shape.size() != world->size())
    return invalid_argument(source + ": parallel { " + shape.str() + " } needs dp * ep * sp = " +
                            std::to_string(shape.size()) + " processes, but the job has " +
                            std::to_string(world->size()) +
                            " (start it with mpirun -np " + std::to_string(shape.size()) +
                            " or change parallel.dp / ep / sp)");
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
