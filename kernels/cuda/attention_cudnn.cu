// cuDNN's fused flash attention for the patterns it expresses: dense causal attention (the
// Transformer baseline) and causal attention in a sliding window, over a whole sequence (queries
// and keys at the same positions, no global rows). Issue 17 asked for it to be measured against our
// kernels and the faster one kept: on an H200 it ran causal attention forward + backward 2.6-2.9x
// faster than attention_mma.cu (docs/PERF.md, session 43).
//
// The graph is built with cuDNN's backend API as its runtime fusion engine recognises it (the
// operations cudnn-frontend emits for cuDNN 9.x below 9.21, written here from its documented
// structure): forward Q K^T, scale, the masks by index comparisons, softmax with the log-sum-exp
// statistics (our `lse`, [B, H, L] in natural log: the two backends' forward and backward mix), P
// V; backward the same scores recomputed from the statistics, dV = P^T dO, dS = P (dO V^T -
// rowsum(dO O)) scale, dK = dS^T Q, dQ = dS K. A plan is built once per shape and kept. Where cuDNN
// refuses a shape, attention.cu runs our kernels (HYDRA_ATTENTION=cudnn makes the refusal an error
// instead; HYDRA_ATTENTION=ours never runs cuDNN). Deterministic mode (train.deterministic) builds
// the backward whose dQ is written without float atomics; its scratch grows with batch x heads x
// length^2, so where a whole batch's would pass the cap the plan runs fewer sequences a call.
#include <cudnn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "base/determinism.h"
#include "kernels/attention.h"
#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"

namespace hydra::kernels::cuda::attention_cudnn {
namespace {

// HYDRA_ATTENTION: auto (or unset) runs cuDNN where it applies, ours elsewhere; cudnn is auto with
// a refused plan an error (tests, benchmarks); ours never runs cuDNN. cuDNN's causal attention
// forward + backward is 2.2x ours at 2K and 2.9x at 8K on an H200, and transformer-toy trains
// 1.30x / 1.83x faster on it (docs/PERF.md, session 45).
enum class Choice { kAuto, kOurs, kCudnn };
Choice choice() { return Choice(env_choice("HYDRA_ATTENTION", {"auto", "ours", "cudnn"})); }

// A refused descriptor: the plan is not built, and the message says why.
struct Refused {
  std::string what;
};

void ok(cudnnStatus_t st, const char* what) {
  if (st == CUDNN_STATUS_SUCCESS) return;
  char last[512] = {0};
  cudnnGetLastErrorString(last, sizeof(last));
  throw Refused{std::string(what) + ": " + cudnnGetErrorString(st) + (last[0] ? " (" : "") + last +
                (last[0] ? ")" : "")};
}

// A backend descriptor, destroyed with its owner.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) {
    ok(cudnnBackendCreateDescriptor(type, &d_), "cudnnBackendCreateDescriptor");
  }
  ~Desc() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }
  template <class V>
  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const V* values,
            int64_t count = 1) {
    ok(cudnnBackendSetAttribute(d_, name, type, count, values), "cudnnBackendSetAttribute");
    return *this;
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, cudnnBackendDescriptor_t d) {
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, &d);
  }
  Desc& finalize(const char* what) {
    ok(cudnnBackendFinalize(d_), what);
    return *this;
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

using Dims = std::vector<int64_t>;

// The descriptors of one graph, kept alive with its plan.
class Graph {
 public:
  // A tensor: non-virtual ones are the variant pack's (by `uid`), virtual ones intermediates.
  cudnnBackendDescriptor_t tensor(const Dims& dims, const Dims& strides, cudnnDataType_t type,
                                  int64_t uid, bool is_virtual = false, bool by_value = false) {
    Desc& t = keep(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t align = 16;
    t.set(CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, &type)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, dims.data(),
             static_cast<int64_t>(dims.size()))
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides.data(),
             static_cast<int64_t>(strides.size()))
        .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, &uid)
        .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, &align);
    const bool yes = true;
    if (is_virtual) t.set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, &yes);
    if (by_value) t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, &yes);
    t.finalize("tensor");
    return t.get();
  }
  // An intermediate of `dims` (row-major strides unless given).
  cudnnBackendDescriptor_t virt(const Dims& dims, cudnnDataType_t type = CUDNN_DATA_FLOAT,
                                Dims strides = {}) {
    if (strides.empty()) {
      strides.assign(dims.size(), 1);
      for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i)
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    return tensor(dims, strides, type, next_uid_++, true);
  }
  // A float scalar passed by value (the variant pack holds a host pointer to it).
  cudnnBackendDescriptor_t scalar(int64_t uid) {
    return tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, uid, false, true);
  }
  void pointwise(cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y,
                 cudnnBackendDescriptor_t b = nullptr, cudnnBackendDescriptor_t t = nullptr,
                 cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    Desc& pw = keep(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, &mode)
        .set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, &math);
    if (axis >= 0) pw.set(CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, &axis);
    pw.finalize("pointwise");
    Desc& op = keep(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    const float one = 1.0f;
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw.get())
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
    if (t) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, &one)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, &one)
        .finalize("pointwise operation");
    ops_.push_back(op.get());
  }
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c) {
    Desc& mm = keep(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    mm.set(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, &comp).finalize("matmul");
    Desc& op = keep(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm.get())
        .finalize("matmul operation");
    ops_.push_back(op.get());
  }
  void reduction(cudnnReduceTensorOp_t how, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t y) {
    Desc& r = keep(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    r.set(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, &comp)
        .set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, &how);
    if (cudnnGetVersion() >= 91100) {  // as the frontend does from 9.11 (row reductions in a warp)
      const bool no = false;
      r.set(CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, CUDNN_TYPE_BOOLEAN, &no);
    }
    r.finalize("reduction");
    Desc& op = keep(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, r.get())
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
        .finalize("reduction operation");
    ops_.push_back(op.get());
  }
  void reshape(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    Desc& op = keep(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y)
        .finalize("reshape operation");
    ops_.push_back(op.get());
  }
  // The operation graph, the first engine configuration of heuristics mode A whose plan builds,
  // and its workspace.
  void build(cudnnHandle_t handle) {
    Desc& graph = keep(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    graph
        .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, ops_.data(),
             static_cast<int64_t>(ops_.size()))
        .set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, &handle)
        .finalize("operation graph");
    Desc& heur = keep(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    const cudnnBackendDescriptor_t g = graph.get();
    heur.set(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, &g)
        .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, &mode)
        .finalize("engine heuristics");
    int64_t count = 0;
    ok(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
       "engine heuristics' results");
    if (count == 0) throw Refused{"no engine for this graph"};
    std::vector<std::unique_ptr<Desc>> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < count; ++i) {
      cfgs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw.push_back(cfgs.back()->get());
    }
    ok(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &count, raw.data()),
       "engine heuristics' results");
    std::string why;
    for (int64_t i = 0; i < count && !plan_; ++i) {
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      const cudnnBackendDescriptor_t cfg = raw[i];
      plan->set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, &cfg)
          .set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, &handle);
      try {
        plan->finalize("execution plan");
      } catch (const Refused& r) {
        why = r.what;
        continue;
      }
      int64_t n = 0;
      ok(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                  CUDNN_TYPE_INT64, 1, &n, &workspace_),
         "plan workspace");
      plan_ = std::move(plan);
      for (auto& c : cfgs) descs_.push_back(std::move(c));
    }
    if (!plan_) throw Refused{"no engine configuration builds a plan: " + why};
  }
  cudnnBackendDescriptor_t plan() const { return plan_->get(); }
  int64_t workspace() const { return workspace_; }

 private:
  Desc& keep(cudnnBackendDescriptorType_t type) {
    descs_.push_back(std::make_unique<Desc>(type));
    return *descs_.back();
  }
  std::deque<std::unique_ptr<Desc>> descs_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  std::unique_ptr<Desc> plan_;
  int64_t workspace_ = 0;
  int64_t next_uid_ = 1000;
};

// The variant pack's tensors.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kdO,
  kdQ,
  kdK,
  kdV,
  kSoftSum,
  kdQacc,
  kScale = 20,
  kNegInf1,
  kNegInf2,
  kWindow,
  kOne,
  kScale2  // a scalar used twice gets a descriptor (and a variant-pack entry) per use
};

size_t align256(size_t b) { return (b + 255) / 256 * 256; }
// A workspace pointer moved up to 256 bytes (the workspace sizes below reserve the 256 it may
// move).
template <class P>
P* align256(P* p) {
  return reinterpret_cast<P*>(align256(reinterpret_cast<uintptr_t>(p)));
}

// A host scalar of the plan, as the variant pack takes it (cuDNN only reads it).
void* host(const float& v) { return const_cast<float*>(&v); }

// What a plan depends on.
struct Key {
  int device;
  int64_t batch, heads, len, head_dim, q_row, k_row, v_row, window;
  double scale;
  bool backward, deterministic;
  auto tie() const {
    return std::tie(device, batch, heads, len, head_dim, q_row, k_row, v_row, window, scale,
                    backward, deterministic);
  }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

struct Plan {
  std::unique_ptr<Graph> graph;  // null: refused
  int64_t per_call = 0;          // sequences a call: the key's batch, or a divisor of it
  std::string refused;
  float scale = 1, neg_inf = -INFINITY, window = 0, one = 1;
};

// Whether the window mask is needed: a window shorter than the sequence.
bool windowed(const Key& k) { return k.window > 0 && k.window < k.len; }

// The masks on scores [B, H, L, L]: causal (key j <= query i), then the window (i - j < W).
// `index_type` is the window's index tensors' type (cuDNN releases differ on what they accept).
cudnnBackendDescriptor_t masked(Graph& g, const Key& k, cudnnBackendDescriptor_t s,
                                cudnnDataType_t index_type) {
  const Dims sd = {k.batch, k.heads, k.len, k.len};
  auto rows = g.virt(sd, CUDNN_DATA_INT32), cols = g.virt(sd, CUDNN_DATA_INT32);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, s, rows, nullptr, nullptr, CUDNN_DATA_FLOAT, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, s, cols, nullptr, nullptr, CUDNN_DATA_FLOAT, 3);
  auto causal = g.virt(sd, CUDNN_DATA_BOOLEAN), out = g.virt(sd);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, rows, causal, cols, nullptr, CUDNN_DATA_BOOLEAN);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, s, out, g.scalar(kNegInf1), causal);
  if (!windowed(k)) return out;
  auto rows2 = g.virt(sd, index_type), cols2 = g.virt(sd, index_type), shifted = g.virt(sd);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, out, rows2, nullptr, nullptr, CUDNN_DATA_FLOAT, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, out, cols2, nullptr, nullptr, CUDNN_DATA_FLOAT, 3);
  g.pointwise(CUDNN_POINTWISE_ADD, cols2, shifted, g.scalar(kWindow));
  auto inside = g.virt(sd, CUDNN_DATA_BOOLEAN), out2 = g.virt(sd);
  g.pointwise(CUDNN_POINTWISE_CMP_GT, shifted, inside, rows2, nullptr, CUDNN_DATA_BOOLEAN);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, out, out2, g.scalar(kNegInf2), inside);
  return out2;
}

// Q, K^T, V^T and V as [B, H, ., .] views of the [B, L, H, dh] rows (no data moves).
struct Inputs {
  cudnnBackendDescriptor_t q, kt, v;
};
Inputs inputs(Graph& g, const Key& k, bool v_transposed) {
  const int64_t B = k.batch, H = k.heads, L = k.len, dh = k.head_dim;
  Inputs in;
  in.q = g.tensor({B, H, L, dh}, {L * k.q_row, dh, k.q_row, 1}, CUDNN_DATA_BFLOAT16, kQ);
  in.kt = g.tensor({B, H, dh, L}, {L * k.k_row, dh, 1, k.k_row}, CUDNN_DATA_BFLOAT16, kK);
  in.v = v_transposed
             ? g.tensor({B, H, dh, L}, {L * k.v_row, dh, 1, k.v_row}, CUDNN_DATA_BFLOAT16, kV)
             : g.tensor({B, H, L, dh}, {L * k.v_row, dh, k.v_row, 1}, CUDNN_DATA_BFLOAT16, kV);
  return in;
}

void build_forward(Graph& g, const Key& k, cudnnDataType_t index_type) {
  const int64_t B = k.batch, H = k.heads, L = k.len, dh = k.head_dim;
  const Dims sd = {B, H, L, L}, rd = {B, H, L, 1}, rs = {H * L, L, 1, 1};
  const Inputs in = inputs(g, k, false);
  auto s0 = g.virt(sd), s1 = g.virt(sd);
  g.matmul(in.q, in.kt, s0);
  g.pointwise(CUDNN_POINTWISE_MUL, s0, s1, g.scalar(kScale));
  auto s = masked(g, k, s1, index_type);
  auto mx = g.virt(rd, CUDNN_DATA_FLOAT, rs), sub = g.virt(sd), e = g.virt(sd);
  auto z = g.virt(rd, CUDNN_DATA_FLOAT, rs), lz = g.virt(rd, CUDNN_DATA_FLOAT, rs);
  auto stats = g.tensor(rd, rs, CUDNN_DATA_FLOAT, kStats);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, s, mx);
  g.pointwise(CUDNN_POINTWISE_SUB, s, sub, mx);
  g.pointwise(CUDNN_POINTWISE_EXP, sub, e);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
  g.pointwise(CUDNN_POINTWISE_LOG, z, lz);
  g.pointwise(CUDNN_POINTWISE_ADD, mx, stats, lz);
  auto p = g.virt(sd, CUDNN_DATA_BFLOAT16);  // the second product's A is in the inputs' type
  g.pointwise(CUDNN_POINTWISE_DIV, e, p, z);
  g.matmul(p, in.v, g.tensor({B, H, L, dh}, {L * H * dh, dh, H * dh, 1}, CUDNN_DATA_BFLOAT16, kO));
}

void build_backward(Graph& g, const Key& k, cudnnDataType_t index_type) {
  const int64_t B = k.batch, H = k.heads, L = k.len, dh = k.head_dim;
  const Dims sd = {B, H, L, L}, rd = {B, H, L, 1}, rs = {H * L, L, 1, 1}, xd = {B, H, L, dh};
  const Dims rows_strides = {L * H * dh, dh, H * dh, 1};  // contiguous [B, L, H, dh]
  const Dims transposed = {H * L * L, L * L, 1, L};
  const Inputs in = inputs(g, k, true);
  auto o = g.tensor(xd, rows_strides, CUDNN_DATA_BFLOAT16, kO);
  auto dout = g.tensor(xd, rows_strides, CUDNN_DATA_BFLOAT16, kdO);
  auto stats = g.tensor(rd, rs, CUDNN_DATA_FLOAT, kStats);
  // rowsum(dO . O) per query (the product laid out as its operands, as cudnn-frontend infers it)
  auto t0 = g.virt(xd, CUDNN_DATA_FLOAT, rows_strides);
  auto t1 = g.virt(rd, CUDNN_DATA_FLOAT, rs);
  auto softsum = g.tensor(rd, rs, CUDNN_DATA_FLOAT, kSoftSum);
  g.pointwise(CUDNN_POINTWISE_MUL, dout, t0, o);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, t0, t1);
  g.pointwise(CUDNN_POINTWISE_MUL, t1, softsum, g.scalar(kOne));
  // P from the statistics
  auto s0 = g.virt(sd), s1 = g.virt(sd), s2 = g.virt(sd);
  g.matmul(in.q, in.kt, s0);
  g.pointwise(CUDNN_POINTWISE_MUL, s0, s1, g.scalar(kScale));
  g.pointwise(CUDNN_POINTWISE_SUB, s1, s2, stats);
  auto s = masked(g, k, s2, index_type);
  auto p = g.virt(sd);
  g.pointwise(CUDNN_POINTWISE_EXP, s, p);
  // dV = P^T dO
  auto pt = g.virt(sd, CUDNN_DATA_BFLOAT16, transposed);
  g.reshape(p, pt);
  g.matmul(pt, dout, g.tensor(xd, rows_strides, CUDNN_DATA_BFLOAT16, kdV));
  // dS = P (dO V^T - rowsum) scale
  auto dp = g.virt(sd), u0 = g.virt(sd), u1 = g.virt(sd), ds = g.virt(sd);
  g.matmul(dout, in.v, dp);
  g.pointwise(CUDNN_POINTWISE_SUB, dp, u0, softsum);
  g.pointwise(CUDNN_POINTWISE_MUL, u0, u1, p);
  g.pointwise(CUDNN_POINTWISE_MUL, u1, ds, g.scalar(kScale2));
  // dK = dS^T Q
  auto dst = g.virt(sd, CUDNN_DATA_BFLOAT16, transposed);
  g.reshape(ds, dst);
  g.matmul(dst, in.q, g.tensor(xd, rows_strides, CUDNN_DATA_BFLOAT16, kdK));
  // dQ = dS K: through a float accumulator, or (deterministic) written directly
  auto kn = g.virt(xd, CUDNN_DATA_BFLOAT16, {L * k.k_row, dh, k.k_row, 1});
  g.reshape(in.kt, kn);
  auto dq = g.tensor(xd, rows_strides, CUDNN_DATA_BFLOAT16, kdQ);
  if (k.deterministic) {
    g.matmul(ds, kn, dq);
  } else {
    auto acc = g.tensor(xd, {H * L * dh, L * dh, dh, 1}, CUDNN_DATA_FLOAT, kdQacc);
    g.matmul(ds, kn, acc);
    g.pointwise(CUDNN_POINTWISE_IDENTITY, acc, dq);
  }
}

struct Cache {
  std::mutex mu;
  std::map<int, cudnnHandle_t> handles;
  std::map<Key, Plan> plans;
};
Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: plans may be used until the process exits
  return *c;
}

// The most scratch a plan may take: HYDRA_CUDNN_WORKSPACE_MB, or by default a sixteenth of the
// device's memory and at least 1 GiB (8.8 GiB on an H200: the deterministic backward of one 16K
// sequence with 6 heads of 64 takes 3 GiB, of one 32K sequence 12 GiB). Tests set it (0: unset).
std::atomic<int64_t> g_max_workspace{0};

int64_t max_workspace(int device) {
  if (const int64_t set = g_max_workspace.load(); set > 0) return set;
  if (const char* v = std::getenv("HYDRA_CUDNN_WORKSPACE_MB"); v != nullptr && *v != 0) {
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    HYDRA_CHECK(*end == 0 && mb > 0 && mb <= (int64_t{1} << 24))
        << "HYDRA_CUDNN_WORKSPACE_MB='" << v
        << "': expected a whole number of MiB, 1 to 16777216 (the most scratch one cuDNN "
           "attention call may take)";
    return int64_t{mb} << 20;
  }
  cudaDeviceProp prop{};
  HYDRA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return std::max<int64_t>(int64_t{1} << 30, static_cast<int64_t>(prop.totalGlobalMem / 16));
}

// Bytes as MiB with one decimal ("768.0 MiB").
std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// cuDNN's graph for `k`, or null with `refused` saying why.
std::unique_ptr<Graph> build_graph(cudnnHandle_t h, const Key& k, std::string& refused) {
  // The window's index tensors: float first, as the frontend of cuDNN 9.14's time built them.
  for (cudnnDataType_t index_type : {CUDNN_DATA_FLOAT, CUDNN_DATA_INT32}) {
    try {
      auto g = std::make_unique<Graph>();
      k.backward ? build_backward(*g, k, index_type) : build_forward(*g, k, index_type);
      g->build(h);
      return g;
    } catch (const Refused& r) {
      refused += (refused.empty() ? "" : "; with int32 indices: ") + r.what;
      if (!windowed(k)) break;
    }
  }
  return nullptr;
}

// The plan for `k` (built on first use), or one whose `graph` is null where cuDNN refused it. A
// graph whose workspace would pass the cap (the deterministic backward's grows with batch x heads
// x length^2: 3 GiB at 4 x 8K with 6 heads of 64) is rebuilt for the largest divisor of the batch
// whose workspace fits, and runs once per that many sequences; refused where one does not fit.
const Plan& plan_for(const Key& k) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.plans.find(k);
  if (it != c.plans.end()) return it->second;
  cudnnHandle_t& h = c.handles[k.device];
  Plan plan;
  plan.scale = static_cast<float>(k.scale);
  plan.window = static_cast<float>(k.window);
  if (!h && cudnnCreate(&h) != CUDNN_STATUS_SUCCESS) {  // refused like a plan: `auto` falls back
    h = nullptr;
    plan.refused = "cudnnCreate failed (is cuDNN's library installed whole?)";
  } else {
    const int64_t cap = max_workspace(k.device);
    for (int64_t n = k.batch; n >= 1; --n) {
      if (k.batch % n != 0) continue;
      Key part = k;
      part.batch = n;
      std::string why;
      plan.graph = build_graph(h, part, why);
      if (!plan.graph) {  // cuDNN refused the graph itself: fewer sequences will not change that
        plan.refused = why;
        break;
      }
      if (plan.graph->workspace() <= cap) {
        plan.per_call = n;
        break;
      }
      plan.refused = "its workspace would be " + mib(plan.graph->workspace()) + " for " +
                     std::to_string(n) + " sequence" + (n > 1 ? "s" : "") + " a call (at most " +
                     mib(cap) + ")";
      plan.graph.reset();
    }
    if (plan.graph && plan.per_call < k.batch)
      std::fprintf(stderr,
                   "attention: cuDNN's fused %s for [%ld x %ld, %ld heads of %ld%s] runs %ld "
                   "sequence(s) a call, in %s of workspace (a whole batch's would pass %s)\n",
                   k.backward ? "backward" : "forward", long(k.batch), long(k.len), long(k.heads),
                   long(k.head_dim), windowed(k) ? ", window" : "", long(plan.per_call),
                   mib(plan.graph->workspace()).c_str(), mib(cap).c_str());
  }
  if (!plan.graph)
    std::fprintf(stderr,
                 "attention: cuDNN refused the fused %s for [%ld x %ld, %ld heads of %ld%s]: %s; "
                 "our kernels run it\n",
                 k.backward ? "backward" : "forward", long(k.batch), long(k.len), long(k.heads),
                 long(k.head_dim), windowed(k) ? ", window" : "", plan.refused.c_str());
  return c.plans.emplace(k, std::move(plan)).first->second;
}

Key key_of(const AttentionParams& p, bool backward) {
  Key k{};
  HYDRA_CUDA_CHECK(cudaGetDevice(&k.device));
  k.batch = p.batch, k.heads = p.heads, k.len = p.q_len, k.head_dim = p.head_dim;
  k.q_row = p.q_row, k.k_row = p.k_row, k.v_row = p.v_row;
  k.window = p.window > 0 && p.window < p.q_len ? p.window : 0;
  k.scale = p.scale;
  k.backward = backward;
  k.deterministic = backward && deterministic();
  return k;
}

// Bytes of the backward's float buffers before the plan's workspace: rowsum(dO . O), and dQ's
// accumulator unless deterministic.
size_t backward_buffers(const Key& k) {
  const size_t rows = static_cast<size_t>(k.batch * k.heads * k.len);
  return align256(rows * 4) + (k.deterministic ? 0 : align256(rows * k.head_dim * 4));
}

// The runtime's release: 9.10.2 or later (sliding windows need 9.2; 9.10.0 and 9.10.1 have known
// bugs in this graph; -inf as the mask's fill needs 9.10).
bool release_supported() {
  static const bool ok = cudnnGetVersion() >= 91002;
  return ok;
}

bool usable_shape(const AttentionParams& p) {
  return release_supported() && p.dtype == DType::kBF16 && p.global_stride <= 0 &&
         p.q_len == p.k_len && p.q_pos0 == p.k_pos0 && p.q_len >= 128 && p.q_len % 128 == 0 &&
         p.head_dim > 0 && p.head_dim % 8 == 0 && p.head_dim <= 128 && p.q_row % 8 == 0 &&
         p.k_row % 8 == 0 && p.v_row % 8 == 0 && aligned16(p.q) && aligned16(p.k) &&
         aligned16(p.v) && aligned16(p.out) && p.lse != nullptr && aligned16(p.lse);
}

}  // namespace

bool applies(const AttentionParams& p) {
  if (choice() == Choice::kOurs || !usable_shape(p)) return false;
  const Plan& plan = plan_for(key_of(p, false));
  HYDRA_CHECK(plan.graph || choice() != Choice::kCudnn)
      << "HYDRA_ATTENTION=cudnn: cuDNN refused the forward: " << plan.refused;
  return plan.graph != nullptr;
}

bool applies(const AttentionBwdParams& q) {
  const AttentionParams& p = q.fwd;
  if (choice() == Choice::kOurs || !usable_shape(p) || q.glse != nullptr || !aligned16(q.gout) ||
      !aligned16(q.gq) || !aligned16(q.gk) || !aligned16(q.gv))
    return false;
  const Plan& plan = plan_for(key_of(p, true));
  HYDRA_CHECK(plan.graph || choice() != Choice::kCudnn)
      << "HYDRA_ATTENTION=cudnn: cuDNN refused the backward: " << plan.refused;
  return plan.graph != nullptr;
}

size_t forward_workspace(const AttentionParams& p) {
  return static_cast<size_t>(plan_for(key_of(p, false)).graph->workspace()) + 256;
}

size_t backward_workspace(const AttentionBwdParams& q) {
  const Key k = key_of(q.fwd, true);
  return backward_buffers(k) + static_cast<size_t>(plan_for(k).graph->workspace()) + 256;
}

namespace {
std::atomic<int64_t> g_calls{0};

void execute(const Key& k, const Plan& plan, cudaStream_t stream,
             const std::vector<std::pair<int64_t, void*>>& tensors, void* workspace) {
  // One handle a device: its stream is set and the plan queued under the cache's lock, so that two
  // host threads cannot queue on each other's stream.
  std::lock_guard<std::mutex> lock(cache().mu);
  cudnnHandle_t h = cache().handles.at(k.device);
  HYDRA_CHECK(cudnnSetStream(h, stream) == CUDNN_STATUS_SUCCESS) << "cudnnSetStream failed";
  std::vector<int64_t> uids;
  std::vector<void*> ptrs;
  for (const auto& [uid, ptr] : tensors) uids.push_back(uid), ptrs.push_back(ptr);
  try {
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids.data(),
             static_cast<int64_t>(uids.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, ptrs.data(),
             static_cast<int64_t>(ptrs.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, &workspace)
        .finalize("variant pack");
    ok(cudnnBackendExecute(h, plan.graph->plan(), pack.get()), "cudnnBackendExecute");
    g_calls.fetch_add(1, std::memory_order_relaxed);
  } catch (const Refused& r) {
    HYDRA_FAIL() << "attention (cuDNN): " << r.what;
  }
}

// `p` at sequence `b` of its batch: the pointer moved by b sequences of `per_seq` elements of
// `bytes` each.
void* at(const void* p, int64_t b, int64_t per_seq, int64_t bytes) {
  return static_cast<char*>(const_cast<void*>(p)) + b * per_seq * bytes;
}
}  // namespace

void forward(const AttentionParams& p) {
  const Key k = key_of(p, false);
  const Plan& plan = plan_for(k);
  HYDRA_CHECK(p.workspace != nullptr || plan.graph->workspace() == 0)
      << "attention (cuDNN): workspace required";
  const int64_t L = k.len, HL = k.heads * k.len, LHd = L * k.heads * k.head_dim;
  for (int64_t b = 0; b < k.batch; b += plan.per_call) {
    std::vector<std::pair<int64_t, void*>> t = {
        {kQ, at(p.q, b, L * k.q_row, 2)}, {kK, at(p.k, b, L * k.k_row, 2)},
        {kV, at(p.v, b, L * k.v_row, 2)}, {kO, at(p.out, b, LHd, 2)},
        {kStats, at(p.lse, b, HL, 4)},    {kScale, host(plan.scale)},
        {kNegInf1, host(plan.neg_inf)}};
    if (windowed(k))
      t.insert(t.end(), {{kNegInf2, host(plan.neg_inf)}, {kWindow, host(plan.window)}});
    execute(k, plan, as_stream(p.stream), t, align256(p.workspace));
  }
}

void backward(const AttentionBwdParams& q) {
  const AttentionParams& p = q.fwd;
  const Key k = key_of(p, true);
  const Plan& plan = plan_for(k);
  HYDRA_CHECK(q.workspace != nullptr) << "attention_bwd (cuDNN): workspace required";
  unsigned char* ws = align256(static_cast<unsigned char*>(q.workspace));
  const size_t rows = static_cast<size_t>(k.batch * k.heads * k.len);
  void* softsum = ws;
  void* acc = ws + align256(rows * 4);
  cudaStream_t s = as_stream(p.stream);
  if (!k.deterministic) HYDRA_CUDA_CHECK(cudaMemsetAsync(acc, 0, rows * k.head_dim * 4, s));
  const int64_t L = k.len, HL = k.heads * k.len, LHd = L * k.heads * k.head_dim;
  for (int64_t b = 0; b < k.batch; b += plan.per_call) {
    std::vector<std::pair<int64_t, void*>> t = {
        {kQ, at(p.q, b, L * k.q_row, 2)}, {kK, at(p.k, b, L * k.k_row, 2)},
        {kV, at(p.v, b, L * k.v_row, 2)}, {kO, at(p.out, b, LHd, 2)},
        {kdO, at(q.gout, b, LHd, 2)},     {kStats, at(p.lse, b, HL, 4)},
        {kdQ, at(q.gq, b, LHd, 2)},       {kdK, at(q.gk, b, LHd, 2)},
        {kdV, at(q.gv, b, LHd, 2)},       {kSoftSum, at(softsum, b, HL, 4)},
        {kScale, host(plan.scale)},       {kScale2, host(plan.scale)},
        {kOne, host(plan.one)},           {kNegInf1, host(plan.neg_inf)}};
    if (windowed(k))
      t.insert(t.end(), {{kNegInf2, host(plan.neg_inf)}, {kWindow, host(plan.window)}});
    if (!k.deterministic) t.emplace_back(kdQacc, at(acc, b, LHd, 4));
    execute(k, plan, s, t, ws + backward_buffers(k));
  }
}

}  // namespace hydra::kernels::cuda::attention_cudnn

namespace hydra::kernels::cuda {
bool attention_cudnn_available() { return attention_cudnn::release_supported(); }

int64_t attention_cudnn_calls() { return attention_cudnn::g_calls.load(std::memory_order_relaxed); }

int64_t attention_cudnn_set_max_workspace(int64_t bytes) {
  return attention_cudnn::g_max_workspace.exchange(bytes);
}
}  // namespace hydra::kernels::cuda
