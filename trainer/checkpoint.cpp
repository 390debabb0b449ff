#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <google/protobuf/util/message_differencer.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "autograd/cuda_context.h"
#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "configs/config_io.h"
#include "data/hdf5_file.h"
#include "trainer/crc32c.h"
#include "trainer/distributed.h"

namespace hydra::trainer {

namespace fs = std::filesystem;

namespace {

constexpr const char* kManifest = "manifest.pb";
// The manifest format this hydra writes (hydra.proto: CheckpointManifest.format_version) and the
// newest it reads.
constexpr int64_t kManifestFormat = 2;
// Bounds of a stored tensor's sizes that no checkpoint reaches (2^40 rows, 2^46 elements): a
// manifest past them is damaged, and its sizes are never multiplied into an overflow.
constexpr int64_t kMaxDim = int64_t{1} << 40, kMaxElements = int64_t{1} << 46;

// One tensor a checkpoint holds, by stored name.
struct Entry {
  std::string name;    // "param/...", "buffer/...", "adam_m/...", "adam_v/..."
  Tensor tensor;       // this rank's copy
  bool range = false;  // a ZeRO-1 range [lo, lo + numel) of the flat local tensor of shape `local`
  int64_t lo = 0;
  Shape local;
};

std::vector<Entry> checkpoint_tensors(const model::LanguageModel& model, const AdamW& opt) {
  std::vector<Entry> out;
  std::map<std::string, Shape> shapes;
  for (const auto& p : model.named_parameters()) {
    out.push_back({"param/" + p.name, p.tensor, false, 0, p.tensor.shape()});
    shapes[p.name] = p.tensor.shape();
  }
  for (const auto& [n, t] : model.named_buffers())
    out.push_back({"buffer/" + n, t, false, 0, t.shape()});
  for (const OptimizerState& s : opt.state())
    out.push_back(
        {s.name, s.tensor, s.sharded, s.lo, s.sharded ? shapes.at(s.param) : s.tensor.shape()});
  return out;
}

int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (const int64_t d : s) n *= d;
  return n;
}

// numel_of for sizes read from a file: -1 where one is negative or the product would pass 2^62.
int64_t checked_numel(const Shape& s) {
  int64_t n = 1;
  for (const int64_t d : s) {
    if (d < 0 || (d > 0 && n > (int64_t{1} << 62) / d)) return -1;
    n *= d;
  }
  return n;
}

// Where this rank's copy of a stored tensor sits in the whole tensor, and whether this rank writes
// it.
struct Placement {
  Shape full;
  int64_t flat = 0;    // first element, in the whole tensor's row-major order
  int64_t offset = 0;  // first row (whole-row slices)
  bool write = false;
};

Placement place(const Entry& e, const parallel::ProcessGrid& grid) {
  Placement p;
  p.full = e.local;
  const auto slash = e.name.find('/');
  const std::string param = slash == std::string::npos ? e.name : e.name.substr(slash + 1);
  if (grid.shape().ep > 1 && e.name.rfind("buffer/", 0) != 0 && is_expert_parameter(param)) {
    p.full[0] = e.local[0] * grid.shape().ep;
    p.offset = grid.ep_rank() * e.local[0];
    p.flat = grid.ep_rank() * numel_of(e.local);
    p.write = grid.dp_rank() == 0 && grid.sp_rank() == 0;  // one writer per expert shard
  } else {
    p.write = grid.world().rank() == 0;
  }
  if (e.range) {  // ZeRO-1: the ranks' ranges partition the tensor; each writes its own
    p.flat += e.lo;
    p.write = e.tensor.numel() > 0;
  }
  return p;
}

// The elements of the whole tensor a record holds, [first, first + count).
int64_t record_first(const config::TensorRecord& r) {
  if (r.has_flat_offset()) return r.flat_offset();
  const Shape full(r.full_shape().begin(), r.full_shape().end());
  if (full.empty() || r.offset_size() == 0) return 0;
  return r.offset(0) * (full[0] > 0 ? numel_of(full) / full[0] : 0);
}

std::string rank_file(int rank) {
  char name[32];
  std::snprintf(name, sizeof name, "rank-%05d.h5", rank);
  return name;
}

// Rank 0 receives every rank's serialized records (one all-gather of sizes, one of padded bytes).
std::vector<std::string> gather_bytes(const std::string& mine, const parallel::ProcessGrid& grid) {
  if (!grid.distributed()) return {mine};
  parallel::Communicator& w = grid.world();
  const int64_t longest =
      static_cast<int64_t>(w.all_reduce_host(double(mine.size()), parallel::ReduceOp::kMax));
  std::vector<int32_t> buf(longest + 1, 0);
  buf[0] = static_cast<int32_t>(mine.size());
  for (std::size_t i = 0; i < mine.size(); ++i) buf[i + 1] = static_cast<unsigned char>(mine[i]);
  const Tensor local = tensor(buf, {longest + 1}).to(w.device());
  Tensor all = Tensor::empty({(longest + 1) * w.size()}, DType::kI32, w.device());
  w.all_gather(local, all);
  const std::vector<int32_t> v = all.cpu().to_vector<int32_t>();
  std::vector<std::string> out;
  for (int r = 0; r < w.size(); ++r) {
    const int32_t* row = v.data() + r * (longest + 1);
    std::string b(static_cast<std::size_t>(row[0]), '\0');
    for (int32_t i = 0; i < row[0]; ++i) b[i] = static_cast<char>(row[i + 1]);
    out.push_back(std::move(b));
  }
  return out;
}

data::Hdf5Type h5_type(DType t) {
  switch (t) {
    case DType::kF32:
      return data::Hdf5Type::kF32;
    case DType::kF64:
      return data::Hdf5Type::kF64;
    case DType::kI32:
      return data::Hdf5Type::kI32;
    case DType::kI64:
      return data::Hdf5Type::kI64;
    case DType::kBF16:
      return data::Hdf5Type::kU16;
  }
  return data::Hdf5Type::kF32;
}

// Files of a checkpoint opened once each, on first use.
class RankFiles {
 public:
  explicit RankFiles(std::string dir) : dir_(std::move(dir)) {}
  Expected<data::Hdf5File*> get(const std::string& file) {
    auto it = files_.find(file);
    if (it == files_.end()) {
      auto f = data::Hdf5File::open_read((fs::path(dir_) / file).string());
      if (!f.ok()) return f.status().with_context("checkpoint " + dir_);
      it = files_.emplace(file, std::move(*f)).first;
    }
    return &it->second;
  }

 private:
  std::string dir_;
  std::map<std::string, data::Hdf5File> files_;
};

// The records of tensor `name` (shape `full`) that hold elements of [first, first + n), each with
// the part it holds, after checking that each agrees with the tensor's shape and dtype, that its
// dataset on disk holds as many elements as the manifest says (before anything is read into a
// buffer of that size), and that together they cover every element exactly once.
struct RecordPart {
  const config::TensorRecord* rec;
  data::Hdf5File* file;
  int64_t r0, lo, hi;  // the record holds [r0, r0 + its size); it gives [lo, hi)
};
Expected<std::vector<RecordPart>> plan_elements(
    const std::string& dir, const std::string& name,
    const std::vector<const config::TensorRecord*>& records, DType dtype, const Shape& full,
    int64_t first, int64_t n, RankFiles& files) {
  std::vector<RecordPart> parts;
  for (const config::TensorRecord* rec : records) {
    const Shape shape(rec->shape().begin(), rec->shape().end()),
        rec_full(rec->full_shape().begin(), rec->full_shape().end());
    if (rec_full != full || rec->dtype() != dtype_name(dtype))
      return data_loss("checkpoint " + dir + ": tensor " + name + " is " + rec->dtype() + " " +
                       shape_str(rec_full) + ", this model has " + std::string(dtype_name(dtype)) +
                       " " + shape_str(full));
    const int64_t r0 = record_first(*rec), rn = numel_of(shape);
    const int64_t lo = std::max(r0, first), hi = std::min(r0 + rn, first + n);
    if (lo >= hi) continue;
    HYDRA_ASSIGN_OR_RETURN(data::Hdf5File * f, files.get(rec->file()));
    auto on_disk = f->shape(name);
    if (!on_disk.ok()) return on_disk.status().with_context("checkpoint " + dir);
    const int64_t held = checked_numel(*on_disk);
    if (held != rn)
      return data_loss("checkpoint " + dir + ": tensor " + name + " in " + rec->file() + " holds " +
                       (held < 0 ? "a damaged size " + shape_str(*on_disk)
                                 : std::to_string(held) + " elements") +
                       ", manifest.pb says " + shape_str(shape) +
                       " (the file or the manifest is damaged)");
    parts.push_back({rec, f, r0, lo, hi});
  }
  std::sort(parts.begin(), parts.end(),
            [](const RecordPart& a, const RecordPart& b) { return a.lo < b.lo; });
  auto gap = [&](int64_t lo, int64_t hi) {
    return data_loss("checkpoint " + dir + ": tensor " + name + " elements [" + std::to_string(lo) +
                     ", " + std::to_string(hi) + ") are not stored (a rank file is missing?)");
  };
  int64_t next = first;
  for (const RecordPart& p : parts) {
    if (p.lo < next)
      return data_loss("checkpoint " + dir + ": tensor " + name + " elements [" +
                       std::to_string(p.lo) + ", " + std::to_string(std::min(next, p.hi)) +
                       ") are stored more than once (the manifest is damaged)");
    if (p.lo > next) return gap(next, p.lo);
    next = p.hi;
  }
  if (next != first + n) return gap(next, first + n);
  return parts;
}

// Fills `host` (n elements of `dtype`) with the parts plan_elements found, checking each record's
// checksum.
Status read_elements(const std::string& dir, const std::string& name,
                     const std::vector<RecordPart>& parts, DType dtype, int64_t first, void* host) {
  for (const RecordPart& p : parts) {
    const config::TensorRecord& rec = *p.rec;
    Tensor stored = Tensor::empty(Shape(rec.shape().begin(), rec.shape().end()), dtype);
    const Status st = p.file->read(name, h5_type(dtype), stored.raw_data());
    if (!st.ok()) return st.with_context("checkpoint " + dir);
    if (crc32c(stored.raw_data(), static_cast<std::size_t>(stored.nbytes())) != rec.crc32c())
      return data_loss("checkpoint " + dir + ": tensor " + name + " in " + rec.file() +
                       " fails its checksum (the file is damaged)");
    const std::size_t elem = dtype_size(dtype);
    std::memcpy(static_cast<char*>(host) + (p.lo - first) * elem,
                static_cast<const char*>(stored.raw_data()) + (p.lo - p.r0) * elem,
                static_cast<std::size_t>(p.hi - p.lo) * elem);
  }
  return ok_status();
}

// A plain file name of the checkpoint's own folder (no directory part, not . or ..).
bool plain_file_name(const std::string& f) {
  return !f.empty() && f != "." && f != ".." && f.find('/') == std::string::npos &&
         f.find('\0') == std::string::npos;
}

// Sizes within the bounds above (the product of the non-zero ones too, so that a zero cannot hide
// sizes whose strides overflow); their product in *numel.
bool sane_shape(const google::protobuf::RepeatedField<int64_t>& dims, int64_t* numel) {
  int64_t nonzero = 1;
  bool empty = false;
  for (const int64_t d : dims) {
    if (d < 0 || d > kMaxDim) return false;
    if (d == 0) {
      empty = true;
      continue;
    }
    if (nonzero > kMaxElements / d) return false;
    nonzero *= d;
  }
  *numel = empty ? 0 : nonzero;
  return true;
}

// Every field of a parsed manifest within what a writer produces: counts and sizes not negative,
// numbers finite, each record a known dtype in a file of the checkpoint's folder and a slice that
// lies within its tensor. The checks behind it (shapes against the model, sizes against the files,
// checksums, coverage) then never meet an impossible value.
Status check_manifest(const config::CheckpointManifest& man, const std::string& dir) {
  auto bad = [&](const std::string& what) {
    return data_loss("checkpoint " + dir + ": manifest.pb is damaged (" + what + ")");
  };
  if (man.step() < 0) return bad("step " + std::to_string(man.step()));
  if (man.stage() < 0) return bad("stage " + std::to_string(man.stage()));
  for (const auto& [field, v] : {std::pair<const char*, int64_t>{"world_size", man.world_size()},
                                 {"dp", man.dp()},
                                 {"ep", man.ep()},
                                 {"sp", man.sp()}})
    if (v < 0 || v > (int64_t{1} << 24)) return bad(std::string(field) + " " + std::to_string(v));
  if (!std::isfinite(man.tokens_seen()) || man.tokens_seen() < 0 ||
      !std::isfinite(man.elapsed_s()) || man.elapsed_s() < 0)
    return bad("tokens_seen or elapsed_s is negative or not finite");
  for (int i = 0; i < man.tensor_size(); ++i) {
    const config::TensorRecord& r = man.tensor(i);
    const std::string what = "tensor record " + std::to_string(i) + " (" + r.name() + ")";
    if (r.name().empty()) return bad(what + " has no name");
    if (!dtype_from_name(r.dtype()).has_value())
      return bad(what + " has the unknown dtype '" + r.dtype() + "'");
    if (!plain_file_name(r.file()))
      return bad(what + " names the file '" + r.file() + "', not one of the checkpoint's folder");
    int64_t count = 0, whole = 0;
    if (!sane_shape(r.shape(), &count) || !sane_shape(r.full_shape(), &whole))
      return bad(what + " has a size that is negative or past any tensor's");
    if (r.has_flat_offset()) {  // a range of the flattened tensor
      if (r.offset_size() != 0 || r.flat_offset() < 0 || r.flat_offset() > whole - count)
        return bad(what + " is a range outside its tensor");
      continue;
    }
    bool inside = r.shape_size() == r.full_shape_size() &&
                  (r.offset_size() == 0 || r.offset_size() == r.shape_size());
    for (int k = 0; inside && k < r.shape_size(); ++k) {
      const int64_t at = r.offset_size() > 0 ? r.offset(k) : 0;
      inside = k == 0 ? at >= 0 && at <= r.full_shape(0) - r.shape(0)
                      : at == 0 && r.shape(k) == r.full_shape(k);
    }
    if (!inside) return bad(what + " is a slice outside its tensor");
  }
  return ok_status();
}

// "model.d_model: 64 (checkpoint) vs 128 (this run)" for the first difference of two model configs.
std::string model_difference(const config::ModelConfig& a, const config::ModelConfig& b) {
  std::string report;
  google::protobuf::util::MessageDifferencer diff;
  diff.ReportDifferencesToString(&report);
  if (diff.Compare(a, b)) return "";
  const auto nl = report.find('\n');
  return nl == std::string::npos ? report : report.substr(0, nl);
}

Status write_file_synced(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return io_error(path + ": cannot write");
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() &&
                  std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  std::fclose(f);
  return ok ? ok_status() : io_error(path + ": write failed (disk full?)");
}

int64_t step_of(const fs::path& dir) {
  const std::string n = dir.filename().string();
  if (n.rfind("step-", 0) != 0 || n.size() <= 5 || n.find('.') != std::string::npos) return -1;
  try {
    return std::stoll(n.substr(5));
  } catch (...) {
    return -1;
  }
}

// Makes the removal of `dir`'s entries so far durable (a directory's fsync), so that a power loss
// cannot bring them back in another order.
void sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

// Removes a checkpoint so that no instant of the removal leaves it looking complete: its manifest
// goes first (durably), then its shards. A removal cut short (a kill, a power loss) leaves a folder
// without a manifest, which latest() skips and the next publish removes; removing the files in
// directory order had left, killed at the wrong instant, a manifest whose shard was gone
// (tests/faults/random_kills.sh, seed 15, session 43).
void retire_checkpoint(const fs::path& dir, std::error_code& ec) {
  if (!fs::exists(dir, ec)) return;
  fs::remove(dir / kManifest, ec);
  sync_directory(dir);
  bool first = true;
  for (const auto& de : fs::directory_iterator(dir, ec)) {
    fs::remove_all(de.path(), ec);
    // Fault injection (tests): the process dies after the first file after the manifest.
    if (first && std::getenv("HYDRA_FAULT_EXIT_DURING_RETIRE") != nullptr) ::_exit(137);
    first = false;
  }
  fs::remove_all(dir, ec);
}

}  // namespace

CheckpointManager::CheckpointManager(const std::string& run_dir, int64_t keep_last)
    : root_((fs::path(run_dir) / "checkpoints").string()), keep_last_(keep_last) {}

std::string CheckpointManager::checkpoint_dir(int64_t step) const {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08ld", static_cast<long>(step));
  return (fs::path(root_) / name).string();
}

// A save between begin_save and finish_save: what the background thread writes, and what rank 0
// needs to publish it.
struct CheckpointManager::Pending {
  std::string tmp_dir, final_dir;
  TrainState state;
  std::string config_text;
  struct Owned {
    std::string name;
    Tensor host;  // this rank's copy, taken at begin_save
  };
  std::vector<Owned> owned;
  config::CheckpointManifest mine;  // this rank's records; checksums filled in by the writer
  Status status = ok_status();      // the writer's
  std::atomic<bool> done{false};
  std::thread writer;
};

CheckpointManager::~CheckpointManager() {
  if (pending_ && pending_->writer.joinable()) pending_->writer.join();
  if (preparing_.joinable()) preparing_.join();
}

void CheckpointManager::prepare_staging(const model::LanguageModel& model, const AdamW& optimizer,
                                        const parallel::ProcessGrid& grid) {
  if (preparing_.joinable()) preparing_.join();
  struct Wanted {
    std::string name;
    Shape shape;
    DType dtype;
    bool pinned;
  };
  std::vector<Wanted> wanted;  // what begin_save would set up: this rank's tensors, not yet staged
  Device device = Device::cpu();
  for (const Entry& e : checkpoint_tensors(model, optimizer)) {
    if (!place(e, grid).write) continue;
    const Tensor& t = e.tensor;
    const auto kept = staging_.find(e.name);
    if (kept != staging_.end() && kept->second.shape() == t.shape() &&
        kept->second.dtype() == t.dtype())
      continue;
    wanted.push_back({e.name, t.shape(), t.dtype(), !t.device().is_cpu()});
    if (t.device().is_cuda()) device = t.device();
  }
  prepared_.clear();
  preparing_ = std::thread([this, device, wanted = std::move(wanted)] {
    try {
      cuda_use_device_on_this_thread(device);  // the rank's GPU, not device 0
      // The page-locked buffers are carved out of one mapping, page-locked once: each tensor's own
      // page-locking (cudaMallocHost for those under 64 MB) holds every thread's CUDA calls while
      // the driver allocates, which slowed the training steps it overlapped (docs/RELIABILITY.md).
      constexpr std::size_t kAlign = 256;  // a multiple of every dtype's size
      std::vector<std::size_t> at(wanted.size(), 0);
      std::size_t total = 0;
      for (std::size_t i = 0; i < wanted.size(); ++i) {
        if (!wanted[i].pinned) continue;
        at[i] = total;
        const auto bytes =
            static_cast<std::size_t>(shape_numel(wanted[i].shape)) * dtype_size(wanted[i].dtype);
        total += (bytes + kAlign - 1) / kAlign * kAlign;
      }
      const Tensor arena =
          total > 0
              ? Tensor::empty_pinned({static_cast<int64_t>(total / sizeof(double))}, DType::kF64)
              : Tensor();
      for (std::size_t i = 0; i < wanted.size(); ++i) {
        const Wanted& w = wanted[i];
        prepared_[w.name] = w.pinned
                                ? Tensor::view_of(arena.storage(),
                                                  static_cast<int64_t>(at[i] / dtype_size(w.dtype)),
                                                  w.shape, contiguous_strides(w.shape), w.dtype)
                                : Tensor::empty(w.shape, w.dtype);
      }
    } catch (const std::exception&) {
      // Out of host memory, say: the save sets its buffers up itself and reports the failure on
      // the training thread, with the step it was saving.
      prepared_.clear();
    }
  });
}

void CheckpointManager::take_prepared(Snapshot* snap) {
  if (!preparing_.joinable()) return;
  const auto t0 = std::chrono::steady_clock::now();
  preparing_.join();
  snap->alloc_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto& [name, t] : prepared_) staging_[name] = std::move(t);
  prepared_.clear();
}

bool CheckpointManager::written() const { return pending_ == nullptr || pending_->done.load(); }

Expected<std::string> CheckpointManager::save(const TrainState& state,
                                              const config::RunConfig& resolved,
                                              const model::LanguageModel& model,
                                              const AdamW& optimizer,
                                              const parallel::ProcessGrid& grid) {
  HYDRA_RETURN_IF_ERROR(begin_save(state, resolved, model, optimizer, grid).status());
  return finish_save(grid);
}

// The publish protocol, its steps numbered in begin_save and finish_save: every rank must take them
// in this order, each agreed on by all ranks before the next.
Expected<CheckpointManager::Snapshot> CheckpointManager::begin_save(
    const TrainState& state, const config::RunConfig& resolved, const model::LanguageModel& model,
    const AdamW& optimizer, const parallel::ProcessGrid& grid) {
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  Snapshot snap;
  const auto t_wait = Clock::now();
  if (pending_) HYDRA_RETURN_IF_ERROR(finish_save(grid).status());
  snap.waited_s = seconds(t_wait);
  take_prepared(&snap);
  auto job = std::make_unique<Pending>();
  job->final_dir = checkpoint_dir(state.step);
  job->tmp_dir = job->final_dir + ".tmp";
  job->state = state;
  job->config_text = config::to_text(resolved);
  const bool lead = grid.world().rank() == 0;
  std::error_code ec;
  // 1. Rank 0 prepares the temporary directory.
  Status st = ok_status();
  if (lead) {
    fs::create_directories(root_, ec);
    fs::remove_all(job->tmp_dir, ec);
    if (!fs::create_directories(job->tmp_dir, ec))
      st = io_error(job->tmp_dir + ": cannot create (" + ec.message() + ")");
  }
  HYDRA_RETURN_IF_ERROR(agree(st, grid));

  // 2. Every rank copies the tensors it owns to host memory (buffers kept from save to save) and
  // describes them (the checksums follow from the copies). CPU tensors are copied too: training
  // updates them in place meanwhile.
  const std::string file = rank_file(grid.world().rank());
  {
    NoGradGuard ng;
    const std::vector<Entry> entries = checkpoint_tensors(model, optimizer);
    for (const Entry& e : entries) {
      const Placement where = place(e, grid);
      if (!where.write) continue;
      const Tensor d = e.tensor.detach();
      Tensor& c = staging_[e.name];
      if (!c.defined() || c.shape() != d.shape() || c.dtype() != d.dtype()) {
        const auto t_alloc = Clock::now();
        c = d.device().is_cpu() ? Tensor::empty(d.shape(), d.dtype())
                                : Tensor::empty_pinned(d.shape(), d.dtype());
        snap.alloc_s += seconds(t_alloc);
        ++snap.allocated;
      }
      const auto t_copy = Clock::now();
      copy_to_host(d, c);
      snap.copy_s += seconds(t_copy);
      snap.bytes += static_cast<double>(c.nbytes());
      auto* rec = job->mine.add_tensor();
      rec->set_name(e.name);
      for (const int64_t n : c.shape()) rec->add_shape(n);
      for (const int64_t n : where.full) rec->add_full_shape(n);
      if (e.range) {
        rec->set_flat_offset(where.flat);
      } else {
        for (std::size_t k = 0; k < c.shape().size(); ++k)
          rec->add_offset(k == 0 ? where.offset : 0);
      }
      rec->set_dtype(std::string(dtype_name(c.dtype())));
      rec->set_file(file);
      job->owned.push_back({e.name, c});
    }
  }
  // 3. The background thread writes this rank's file (training goes on).
  Pending* p = job.get();
  const std::string path = (fs::path(job->tmp_dir) / file).string();
  p->writer = std::thread([p, path, step = state.step] {
    p->status = [&]() -> Status {
      try {
        if (p->owned.empty()) return ok_status();
        if (const char* ms = std::getenv("HYDRA_TEST_SLOW_WRITE_MS"))  // tests: a slow disk
          std::this_thread::sleep_for(std::chrono::milliseconds(std::atoll(ms)));
        HYDRA_ASSIGN_OR_RETURN(data::Hdf5File f, data::Hdf5File::create(path));
        for (std::size_t i = 0; i < p->owned.size(); ++i) {
          const Tensor& c = p->owned[i].host;
          HYDRA_RETURN_IF_ERROR(
              f.write(p->owned[i].name, h5_type(c.dtype()), c.shape(), c.raw_data()));
          p->mine.mutable_tensor(static_cast<int>(i))
              ->set_crc32c(crc32c(c.raw_data(), static_cast<std::size_t>(c.nbytes())));
          // Fault injection (tests): the process dies while the checkpoint of the step named is
          // being written (its first tensor written, the rest not).
          if (const char* at = std::getenv("HYDRA_FAULT_EXIT_DURING_WRITE");
              i == 0 && at != nullptr && std::atoll(at) == step)
            ::_exit(137);
        }
        return f.flush();
      } catch (const std::exception& e) {
        return io_error(path + ": " + e.what());
      }
    }();
    p->owned.clear();  // the host copies are no longer needed
    p->done.store(true);
  });
  pending_ = std::move(job);
  return snap;
}

Expected<std::string> CheckpointManager::finish_save(const parallel::ProcessGrid& grid) {
  HYDRA_CHECK(pending_ != nullptr) << "finish_save: no save was begun";
  const std::unique_ptr<Pending> job = std::move(pending_);
  job->writer.join();
  // 4. Every rank's file is written (or the save fails on every rank).
  HYDRA_RETURN_IF_ERROR(agree(job->status, grid));
  const bool lead = grid.world().rank() == 0;
  std::error_code ec;
  const std::string &tmp_dir = job->tmp_dir, &final_dir = job->final_dir;
  const TrainState& state = job->state;

  // 5. Rank 0 collects the records, writes the manifest last and moves the directory into place.
  const std::vector<std::string> parts = gather_bytes(job->mine.SerializeAsString(), grid);
  Status st = ok_status();
  if (lead) {
    config::CheckpointManifest man;
    for (const std::string& bytes : parts) {
      config::CheckpointManifest part;
      part.ParseFromString(bytes);
      for (const auto& r : part.tensor()) *man.add_tensor() = r;
    }
    man.set_step(state.step);
    man.set_stage(state.stage);
    man.set_config_text(job->config_text);
    man.set_rng_seed(state.rng.seed);
    man.set_rng_offset(state.rng.offset);
    man.set_data_seed(state.data_seed);
    man.set_world_size(grid.world().size());
    man.set_dp(grid.shape().dp);
    man.set_ep(grid.shape().ep);
    man.set_sp(grid.shape().sp);
    man.set_tokens_seen(state.tokens_seen);
    man.set_elapsed_s(state.elapsed_s);
    char host[128] = {};
    gethostname(host, sizeof host - 1);
    man.set_written_by(std::string("hydra 0.1.0 on ") + host);
    st = [&]() -> Status {
      HYDRA_RETURN_IF_ERROR(write_manifest(tmp_dir, std::move(man)));
      // The same step saved before (a resumed run): moved aside by a rename first, so that at
      // every instant final_dir is a whole checkpoint or absent (the aside is a stale temporary).
      const fs::path aside = final_dir + ".replaced.tmp";
      std::error_code aside_ec;
      if (fs::exists(final_dir, aside_ec)) {
        fs::remove_all(aside, aside_ec);
        fs::rename(final_dir, aside, aside_ec);
      }
      fs::rename(tmp_dir, final_dir, ec);
      if (ec)
        return io_error(final_dir + ": cannot move the checkpoint into place: " + ec.message());
      fs::remove_all(aside, aside_ec);
      // Fault injection (tests): the process dies right after the checkpoint is published, the
      // worst instant for anything written after it.
      if (std::getenv("HYDRA_FAULT_EXIT_AFTER_PUBLISH") != nullptr) ::_exit(137);
      // Keep the newest keep_last complete checkpoints; remove stale temporaries and the folders
      // of removals cut short (no manifest: a publish renames a folder that holds one).
      std::vector<std::pair<int64_t, fs::path>> done;
      for (const auto& de : fs::directory_iterator(root_, ec)) {
        const std::string n = de.path().filename().string();
        if (n.ends_with(".tmp") && de.path() != fs::path(tmp_dir)) {
          fs::remove_all(de.path(), ec);
          continue;
        }
        const int64_t s = step_of(de.path());
        if (s < 0) continue;
        if (fs::exists(de.path() / kManifest))
          done.emplace_back(s, de.path());
        else
          fs::remove_all(de.path(), ec);
      }
      std::sort(done.begin(), done.end());
      for (std::size_t i = 0; i + static_cast<std::size_t>(keep_last_) < done.size(); ++i)
        retire_checkpoint(done[i].second, ec);
      return ok_status();
    }();
  }
  HYDRA_RETURN_IF_ERROR(agree(st, grid));
  return final_dir;
}

Expected<std::string> CheckpointManager::latest(int64_t before) const {
  std::error_code ec;
  int64_t best = -1;
  std::string best_dir;
  if (fs::is_directory(root_, ec))
    for (const auto& de : fs::directory_iterator(root_, ec)) {
      const int64_t s = step_of(de.path());
      if (s > best && (before < 0 || s < before) && fs::exists(de.path() / kManifest)) {
        best = s;
        best_dir = de.path().string();
      }
    }
  if (best < 0) return not_found(root_ + ": no complete checkpoint to resume from");
  return best_dir;
}

std::vector<std::string> CheckpointManager::newer_than(int64_t step) const {
  std::error_code ec;
  std::vector<std::pair<int64_t, std::string>> found;
  if (fs::is_directory(root_, ec))
    for (const auto& de : fs::directory_iterator(root_, ec))
      if (const int64_t s = step_of(de.path()); s > step) found.emplace_back(s, de.path().string());
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  out.reserve(found.size());
  for (auto& [s, dir] : found) out.push_back(std::move(dir));
  return out;
}

int64_t CheckpointManager::step_of_dir(const std::string& dir) {
  return step_of(fs::path(dir).lexically_normal());
}

Status CheckpointManager::write_manifest(const std::string& dir, config::CheckpointManifest man) {
  man.set_format_version(kManifestFormat);
  man.clear_manifest_crc32c();
  std::string bytes = man.SerializeAsString();
  config::CheckpointManifest tail;  // the checksum field alone, encoded after the rest
  tail.set_manifest_crc32c(crc32c(bytes.data(), bytes.size()));
  bytes += tail.SerializeAsString();
  return write_file_synced((fs::path(dir) / kManifest).string(), bytes);
}

Expected<config::CheckpointManifest> CheckpointManager::read_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / kManifest).string();
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return not_found("checkpoint " + dir +
                     ": no manifest.pb (an incomplete checkpoint; pick another)");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  config::CheckpointManifest man;
  if (!man.ParseFromString(bytes) || !man.has_step())
    return data_loss("checkpoint " + dir + ": manifest.pb is damaged (cannot be parsed)");
  // Format 2 ends with its checksum; a format-1 manifest has none (one that names one is checked
  // all the same, so that one damaged byte cannot turn a new manifest into an unchecked old one).
  // The checksum first: a damaged version number is damage, not a newer hydra.
  if (man.format_version() >= 2 || man.has_manifest_crc32c()) {
    config::CheckpointManifest tail;
    tail.set_manifest_crc32c(man.manifest_crc32c());
    const std::string end = tail.SerializeAsString();
    if (!man.has_manifest_crc32c() || !bytes.ends_with(end) ||
        crc32c(bytes.data(), bytes.size() - end.size()) != man.manifest_crc32c())
      return data_loss("checkpoint " + dir + ": manifest.pb is damaged (it fails its checksum)");
  }
  if (man.format_version() > kManifestFormat)
    return failed_precondition("checkpoint " + dir + ": manifest.pb is of format " +
                               std::to_string(man.format_version()) + ", this hydra reads 1 to " +
                               std::to_string(kManifestFormat) +
                               " (written by a newer hydra: " + man.written_by() + ")");
  HYDRA_RETURN_IF_ERROR(check_manifest(man, dir));
  return man;
}

Status CheckpointManager::load(const std::string& dir, const config::RunConfig& resolved,
                               model::LanguageModel& model, AdamW& optimizer, TrainState* state,
                               const parallel::ProcessGrid& grid) {
  HYDRA_ASSIGN_OR_RETURN(config::CheckpointManifest man, read_manifest(dir));
  config::RunConfig saved;
  if (!config::parse_text(man.config_text(), dir + "/manifest.pb", &saved).ok())
    return data_loss("checkpoint " + dir + ": the config stored in manifest.pb cannot be parsed");
  const std::string difference = model_difference(saved.model(), resolved.model());
  if (!difference.empty())
    return failed_precondition(
        "checkpoint " + dir + " was written for another model config (first difference: " +
        difference + "); resume it with the config it was trained with, or start a new run");
  std::map<std::string, std::vector<const config::TensorRecord*>> records;
  for (const auto& r : man.tensor()) records[r.name()].push_back(&r);
  RankFiles files(dir);
  NoGradGuard ng;
  for (const Entry& e : checkpoint_tensors(model, optimizer)) {
    const std::string& name = e.name;
    const Tensor& t = e.tensor;
    const int64_t n = t.numel();
    if (n == 0) continue;  // an empty ZeRO-1 range: nothing of this tensor lives here
    auto it = records.find(name);
    if (it == records.end())
      return data_loss("checkpoint " + dir + ": tensor " + name + " is missing");
    // The elements [first, first + n) of the whole tensor this rank holds, from the records
    // covering them (whole tensors, row slices of expert shards, or ZeRO-1 ranges: any layout reads
    // any other).
    const Placement want = place(e, grid);
    HYDRA_ASSIGN_OR_RETURN(
        const std::vector<RecordPart> parts,
        plan_elements(dir, name, it->second, t.dtype(), want.full, want.flat, n, files));
    Tensor host = Tensor::empty(t.shape(), t.dtype());
    HYDRA_RETURN_IF_ERROR(read_elements(dir, name, parts, t.dtype(), want.flat, host.raw_data()));
    Tensor dst = t;  // a handle to the same tensor
    dst.copy_(host);
  }
  optimizer.set_steps(man.step());
  state->step = man.step();
  state->stage = man.stage();
  state->rng = {man.rng_seed(), man.rng_offset()};
  state->data_seed = man.data_seed();
  state->tokens_seen = man.tokens_seen();
  state->elapsed_s = man.elapsed_s();
  return ok_status();
}

Expected<std::vector<StoredTensor>> stored_tensors(const config::CheckpointManifest& man,
                                                   const std::string& dir) {
  std::vector<StoredTensor> out;
  std::map<std::string, std::size_t> index;
  for (const auto& r : man.tensor()) {
    auto [it, fresh] = index.emplace(r.name(), out.size());
    const Shape full(r.full_shape().begin(), r.full_shape().end());
    const auto dtype = dtype_from_name(r.dtype());
    if (!dtype.has_value())
      return data_loss("checkpoint " + dir + ": tensor " + r.name() + " has an unknown dtype '" +
                       r.dtype() + "' (the manifest is damaged or from a newer hydra)");
    if (fresh) {
      out.push_back({r.name(), full, *dtype, {}});
    } else if (out[it->second].shape != full || out[it->second].dtype != *dtype) {
      return data_loss("checkpoint " + dir + ": the records of tensor " + r.name() +
                       " disagree on its shape or dtype (the manifest is damaged)");
    }
    out[it->second].records.push_back(&r);
  }
  return out;
}

struct StoredTensorReader::Files : RankFiles {
  using RankFiles::RankFiles;
};

StoredTensorReader::StoredTensorReader(std::string dir)
    : dir_(std::move(dir)), files_(std::make_unique<Files>(dir_)) {}

StoredTensorReader::~StoredTensorReader() = default;

Expected<Tensor> StoredTensorReader::read(const StoredTensor& t) {
  const int64_t n = numel_of(t.shape);  // within bounds: read_manifest checked the sizes
  HYDRA_ASSIGN_OR_RETURN(const std::vector<RecordPart> parts,
                         plan_elements(dir_, t.name, t.records, t.dtype, t.shape, 0, n, *files_));
  Tensor host = Tensor::empty(t.shape, t.dtype);  // its records are on disk: a size they hold
  HYDRA_RETURN_IF_ERROR(read_elements(dir_, t.name, parts, t.dtype, 0, host.raw_data()));
  return host;
}

}  // namespace hydra::trainer
