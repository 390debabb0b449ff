#include "parallel/communicator.h"

#include <algorithm>
#include <cstring>
#include <sstream>

#include "autograd/ops.h"
#include "base/check.h"

namespace hydra::parallel {
namespace {

class DoneWork final : public Work {
 public:
  void wait() override {}
};

}  // namespace

void Communicator::all_reduce_host(std::vector<double>& values, ReduceOp op) {
  if (size() == 1 || values.empty()) return;
  Tensor t = tensor(values, {static_cast<int64_t>(values.size())}).to(device());
  all_reduce(t, op);
  synchronize();  // a deadline instead of a hang in the copy below
  values = t.cpu().to_vector<double>();
}

void HostSum::sum(Communicator* comm, ReduceOp op) const {
  if (comm == nullptr || comm->size() == 1) return;
  std::vector<double> flat;
  for (const std::span<double>& p : parts_) flat.insert(flat.end(), p.begin(), p.end());
  comm->all_reduce_host(flat, op);
  std::size_t i = 0;
  for (const std::span<double>& p : parts_)
    for (double& v : p) v = flat[i++];
}

double Communicator::all_reduce_host(double value, ReduceOp op) {
  std::vector<double> v{value};
  all_reduce_host(v, op);
  return v[0];
}

std::unique_ptr<Work> SelfCommunicator::all_reduce_async(const Tensor&) {
  return std::make_unique<DoneWork>();
}

void SelfCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  HYDRA_CHECK(in.numel() == out.numel()) << "all_gather on '" << name_ << "': sizes differ";
  if (in.numel() == 0 || in.raw_data() == out.raw_data()) return;  // in place
  Tensor o = out;
  o.copy_(in.reshape(out.shape()));
}

void SelfCommunicator::reduce_scatter(const Tensor& in, const Tensor& out) {
  HYDRA_CHECK(in.numel() == out.numel()) << "reduce_scatter on '" << name_ << "': sizes differ";
  Tensor o = out;
  o.copy_(in.reshape(out.shape()));
}

std::unique_ptr<Work> SelfCommunicator::reduce_scatter_async(const Tensor& in, const Tensor& out) {
  reduce_scatter(in, out);
  return std::make_unique<DoneWork>();
}

void SelfCommunicator::all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts,
                                    const Tensor& recv, const std::vector<int64_t>& recv_counts) {
  HYDRA_CHECK(send_counts.size() == 1 && recv_counts.size() == 1 &&
              send_counts[0] == recv_counts[0] && send.numel() == recv.numel())
      << "all_to_all_v on '" << name_ << "': one rank must receive what it sends";
  Tensor r = recv;
  if (send.numel() > 0) r.copy_(send.reshape(recv.shape()));
}

void SelfCommunicator::send_recv(const Tensor& send, int dest, const Tensor& recv, int src) {
  HYDRA_CHECK(dest < 0 && src < 0) << "send_recv on '" << name_ << "': a single rank has no peers";
}

// `text` of rank `root`, on every rank (host values summed over the ranks: only root's are
// non-zero).
namespace {

std::string share_text(Communicator& world, const std::string& text, int root) {
  const bool mine = world.rank() == root;
  const auto n = static_cast<std::size_t>(world.all_reduce_host(mine ? double(text.size()) : 0.0));
  std::vector<double> chars(n, 0.0);
  if (mine)
    for (std::size_t i = 0; i < n; ++i) chars[i] = static_cast<unsigned char>(text[i]);
  world.all_reduce_host(chars);
  std::string out(n, '\0');
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<char>(static_cast<int>(chars[i]));
  return out;
}

}  // namespace

// Compares a hash of the config's text (in 21-bit pieces, exact as doubles); on a difference, finds
// the first line that differs from rank 0's and names it, with both values, on every rank.
Status check_same_config(Communicator& world, const std::string& text, const std::string& source) {
  if (world.size() == 1) return ok_status();
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  std::vector<double> lo, hi;
  for (int k = 0; k < 3; ++k) lo.push_back(double((h >> (21 * k)) & ((1u << 21) - 1)));
  hi = lo;
  world.all_reduce_host(lo, ReduceOp::kMin);
  world.all_reduce_host(hi, ReduceOp::kMax);
  if (lo == hi) return ok_status();
  auto lines = [](const std::string& s) {
    std::vector<std::string> v;
    std::istringstream in(s);
    for (std::string l; std::getline(in, l);) v.push_back(l);
    return v;
  };
  const std::vector<std::string> ref = lines(share_text(world, text, 0)), own = lines(text);
  std::size_t first = std::max(ref.size(), own.size());
  for (std::size_t i = 0; i < std::max(ref.size(), own.size()); ++i)
    if (i >= ref.size() || i >= own.size() || ref[i] != own[i]) {
      first = i;
      break;
    }
  const double big = 1e18;
  const double line = world.all_reduce_host(
      first < std::max(ref.size(), own.size()) ? double(first) : big, ReduceOp::kMin);
  const int who = static_cast<int>(
      world.all_reduce_host(double(first) == line ? double(world.rank()) : big, ReduceOp::kMin));
  const auto at = static_cast<std::size_t>(line);
  const std::string theirs =
      share_text(world, at < own.size() ? own[at] : std::string("(end of config)"), who);
  auto trim = [](std::string s) {
    s.erase(0, s.find_first_not_of(' '));
    return s;
  };
  return invalid_argument(source + ": the ranks' configs differ: rank " + std::to_string(who) +
                          " has '" + trim(theirs) + "' where rank 0 has '" +
                          trim(at < ref.size() ? ref[at] : std::string("(end of config)")) +
                          "' (line " + std::to_string(at + 1) +
                          " of the resolved config); start every rank with the same "
                          "--config and --set values");
}

}  // namespace hydra::parallel
