#include "parallel/collectives.h"

#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"

namespace hydra::parallel {
namespace {

Tensor or_zeros(const Tensor& g, const Shape& shape, DType dtype, Device device) {
  return g.defined() ? g.contiguous() : zeros(shape, dtype, device);
}

Shape with_rows(const Shape& s, int64_t rows) {
  Shape out = s;
  out[0] = rows;
  return out;
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

}  // namespace

Tensor all_gather(const Tensor& x_in, Communicator& c) {
  HYDRA_CHECK(x_in.dim() >= 1) << "all_gather: need at least one dimension";
  const Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), size = c.size();
  Tensor out = Tensor::empty(with_rows(x.shape(), n * size), x.dtype(), x.device());
  c.all_gather(x, out);
  Communicator* cp = &c;
  const Shape& xs = x.shape();
  const DType dt = x.dtype();
  const Device dev = x.device();
  record_collective_op("all_gather", {x_in}, {out},
                       [cp, xs, n, size, dt, dev](const std::vector<Tensor>& g) {
                         const Tensor go = or_zeros(g[0], with_rows(xs, n * size), dt, dev);
                         Tensor gx = Tensor::empty(xs, dt, dev);
                         cp->reduce_scatter(go, gx);
                         return std::vector<Tensor>{gx};
                       });
  return out;
}

Tensor all_reduce_sum(const Tensor& x_in, Communicator& c) {
  Tensor out = x_in.contiguous().clone().detach();
  c.all_reduce(out, ReduceOp::kSum);
  Communicator* cp = &c;
  const Shape& xs = x_in.shape();
  const DType dt = x_in.dtype();
  const Device dev = x_in.device();
  record_collective_op("all_reduce_sum", {x_in}, {out},
                       [cp, xs, dt, dev](const std::vector<Tensor>& g) {
                         Tensor gx = or_zeros(g[0], xs, dt, dev).clone();
                         cp->all_reduce(gx, ReduceOp::kSum);
                         return std::vector<Tensor>{gx};
                       });
  return out;
}

Tensor all_to_all(const Tensor& x_in, const std::vector<int64_t>& send_counts,
                  const std::vector<int64_t>& recv_counts, Communicator& c) {
  HYDRA_CHECK(x_in.dim() >= 1 && x_in.size(0) == sum(send_counts))
      << "all_to_all: " << x_in.size(0) << " rows for send counts summing to " << sum(send_counts);
  const Tensor x = x_in.contiguous();
  Tensor out = Tensor::empty(with_rows(x.shape(), sum(recv_counts)), x.dtype(), x.device());
  c.all_to_all_v(x, send_counts, out, recv_counts);
  Communicator* cp = &c;
  const Shape& xs = x.shape();
  const Shape& os = out.shape();
  const DType dt = x.dtype();
  const Device dev = x.device();
  record_collective_op(
      "all_to_all", {x_in}, {out},
      [cp, xs, os, dt, dev, send_counts, recv_counts](const std::vector<Tensor>& g) {
        const Tensor go = or_zeros(g[0], os, dt, dev);
        Tensor gx = Tensor::empty(xs, dt, dev);
        cp->all_to_all_v(go, recv_counts, gx, send_counts);
        return std::vector<Tensor>{gx};
      });
  return out;
}

namespace {

// Receive from `from`, send to `to` (-1: none); missing data is zeros.
Tensor shift(const Tensor& x_in, Communicator& c, int direction) {
  const Tensor x = x_in.contiguous();
  const int r = c.rank(), n = c.size();
  const int to = r + direction >= 0 && r + direction < n ? r + direction : -1;
  const int from = r - direction >= 0 && r - direction < n ? r - direction : -1;
  Tensor out = zeros(x.shape(), x.dtype(), x.device());
  c.send_recv(x, to, out, from);
  Communicator* cp = &c;
  const Shape& xs = x.shape();
  const DType dt = x.dtype();
  const Device dev = x.device();
  record_collective_op(
      "shift", {x_in}, {out}, [cp, xs, dt, dev, to, from](const std::vector<Tensor>& g) {
        const Tensor go = or_zeros(g[0], xs, dt, dev);
        Tensor gx = zeros(xs, dt, dev);
        cp->send_recv(go, from, gx, to);  // the gradient of what came from `from` goes back there
        return std::vector<Tensor>{gx};
      });
  return out;
}

}  // namespace

Tensor shift_from_previous(const Tensor& x, Communicator& c) { return shift(x, c, +1); }
Tensor shift_from_next(const Tensor& x, Communicator& c) { return shift(x, c, -1); }

Tensor receive_from_previous(const Tensor& first, Communicator& c) {
  const int r = c.rank();
  if (r == 0) {
    // Still a collective node: its backward must not send anything, but keeps the graph uniform.
    return first;
  }
  Tensor out = zeros(first.shape(), first.dtype(), first.device());
  c.send_recv(Tensor(), -1, out, r - 1);
  Communicator* cp = &c;
  const Shape& s = first.shape();
  const DType dt = first.dtype();
  const Device dev = first.device();
  // `first` is not an input here: its value was not used on this rank.
  record_collective_op("receive_from_previous", {}, {out},
                       [cp, s, dt, dev, r](const std::vector<Tensor>& g) {
                         cp->send_recv(or_zeros(g[0], s, dt, dev), r - 1, Tensor(), -1);
                         return std::vector<Tensor>{};
                       });
  return out;
}

Tensor send_to_next(const Tensor& x_in, Communicator& c) {
  const Tensor x = x_in.contiguous();
  const int r = c.rank(), n = c.size();
  const int next = r + 1 < n ? r + 1 : -1;
  c.send_recv(x, next, Tensor(), -1);
  Tensor token = zeros({}, x.dtype(), x.device());
  Communicator* cp = &c;
  const Shape& xs = x.shape();
  const DType dt = x.dtype();
  const Device dev = x.device();
  record_collective_op("send_to_next", {x_in}, {token},
                       [cp, xs, dt, dev, next](const std::vector<Tensor>& g) {
                         Tensor gx = zeros(xs, dt, dev);
                         cp->send_recv(Tensor(), -1, gx, next);
                         return std::vector<Tensor>{gx};
                       });
  return token;
}

}  // namespace hydra::parallel
