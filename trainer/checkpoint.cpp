#include "trainer/checkpoint.h"

#include <google/protobuf/util/message_differencer.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "configs/config_io.h"
#include "data/hdf5_file.h"
#include "trainer/crc32c.h"

namespace hydra::trainer {

namespace fs = std::filesystem;

namespace {

constexpr const char* kRankFile = "rank-00000.h5";
constexpr const char* kManifest = "manifest.pb";

// Everything a checkpoint holds, by stored name.
std::vector<std::pair<std::string, Tensor>> checkpoint_tensors(const model::LanguageModel& model, const AdamW& opt) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& p : model.named_parameters()) out.emplace_back("param/" + p.name, p.tensor);
  for (const auto& [n, t] : model.named_buffers()) out.emplace_back("buffer/" + n, t);
  for (auto& [n, t] : opt.state()) out.emplace_back(n, t);
  return out;
}

hid_t h5_type(DType t) {
  switch (t) {
    case DType::kF32: return H5T_NATIVE_FLOAT;
    case DType::kF64: return H5T_NATIVE_DOUBLE;
    case DType::kI32: return H5T_NATIVE_INT32;
    case DType::kI64: return H5T_NATIVE_INT64;
    case DType::kBF16: return H5T_NATIVE_UINT16;
  }
  return H5T_NATIVE_FLOAT;
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
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
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

}  // namespace

CheckpointManager::CheckpointManager(std::string run_dir, int64_t keep_last)
    : root_((fs::path(run_dir) / "checkpoints").string()), keep_last_(keep_last) {}

std::string CheckpointManager::checkpoint_dir(int64_t step) const {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08ld", static_cast<long>(step));
  return (fs::path(root_) / name).string();
}

Expected<std::string> CheckpointManager::save(const TrainState& state, const config::RunConfig& resolved,
                                              const model::LanguageModel& model, const AdamW& optimizer) const {
  const std::string final_dir = checkpoint_dir(state.step), tmp_dir = final_dir + ".tmp";
  std::error_code ec;
  fs::create_directories(root_, ec);
  fs::remove_all(tmp_dir, ec);
  if (!fs::create_directories(tmp_dir, ec)) return io_error(tmp_dir + ": cannot create (" + ec.message() + ")");

  config::CheckpointManifest man;
  man.set_step(state.step);
  man.set_stage(state.stage);
  man.set_config_text(config::to_text(resolved));
  man.set_rng_seed(state.rng.seed);
  man.set_rng_offset(state.rng.offset);
  man.set_data_seed(state.data_seed);
  man.set_world_size(1);
  man.set_dp(1);
  man.set_ep(1);
  man.set_sp(1);
  man.set_tokens_seen(state.tokens_seen);
  man.set_elapsed_s(state.elapsed_s);
  char host[128] = {};
  gethostname(host, sizeof host - 1);
  man.set_written_by(std::string("hydra 0.1.0 on ") + host);
  {
    HYDRA_ASSIGN_OR_RETURN(data::Hdf5File f, data::Hdf5File::create((fs::path(tmp_dir) / kRankFile).string()));
    NoGradGuard ng;
    for (const auto& [name, t] : checkpoint_tensors(model, optimizer)) {
      const Tensor c = t.detach().contiguous().cpu();
      HYDRA_RETURN_IF_ERROR(f.write(name, h5_type(c.dtype()), c.shape(), c.raw_data()));
      auto* rec = man.add_tensor();
      rec->set_name(name);
      for (int64_t s : c.shape()) {
        rec->add_shape(s);
        rec->add_full_shape(s);
        rec->add_offset(0);
      }
      rec->set_dtype(std::string(dtype_name(c.dtype())));
      rec->set_file(kRankFile);
      rec->set_crc32c(crc32c(c.raw_data(), static_cast<std::size_t>(c.nbytes())));
    }
    HYDRA_RETURN_IF_ERROR(f.flush());
  }
  HYDRA_RETURN_IF_ERROR(write_file_synced((fs::path(tmp_dir) / kManifest).string(), man.SerializeAsString()));
  fs::remove_all(final_dir, ec);
  fs::rename(tmp_dir, final_dir, ec);
  if (ec) return io_error(final_dir + ": cannot move the checkpoint into place: " + ec.message());

  // Keep the newest keep_last complete checkpoints; remove stale temporaries.
  std::vector<std::pair<int64_t, fs::path>> done;
  for (const auto& de : fs::directory_iterator(root_, ec)) {
    const std::string n = de.path().filename().string();
    if (n.ends_with(".tmp") && de.path() != fs::path(tmp_dir)) {
      fs::remove_all(de.path(), ec);
      continue;
    }
    const int64_t s = step_of(de.path());
    if (s >= 0 && fs::exists(de.path() / kManifest)) done.emplace_back(s, de.path());
  }
  std::sort(done.begin(), done.end());
  for (std::size_t i = 0; i + static_cast<std::size_t>(keep_last_) < done.size(); ++i) fs::remove_all(done[i].second, ec);
  return final_dir;
}

Expected<std::string> CheckpointManager::latest() const {
  std::error_code ec;
  int64_t best = -1;
  std::string best_dir;
  if (fs::is_directory(root_, ec))
    for (const auto& de : fs::directory_iterator(root_, ec)) {
      const int64_t s = step_of(de.path());
      if (s > best && fs::exists(de.path() / kManifest)) {
        best = s;
        best_dir = de.path().string();
      }
    }
  if (best < 0) return not_found(root_ + ": no complete checkpoint to resume from");
  return best_dir;
}

Expected<config::CheckpointManifest> CheckpointManager::read_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / kManifest).string();
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("checkpoint " + dir + ": no manifest.pb (an incomplete checkpoint; pick another)");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  config::CheckpointManifest man;
  if (!man.ParseFromString(bytes) || !man.has_step())
    return data_loss("checkpoint " + dir + ": manifest.pb is damaged (cannot be parsed)");
  return man;
}

Status CheckpointManager::load(const std::string& dir, const config::RunConfig& resolved, model::LanguageModel& model,
                               AdamW& optimizer, TrainState* state) {
  HYDRA_ASSIGN_OR_RETURN(config::CheckpointManifest man, read_manifest(dir));
  config::RunConfig saved;
  if (!config::parse_text(man.config_text(), dir + "/manifest.pb", &saved).ok())
    return data_loss("checkpoint " + dir + ": the config stored in manifest.pb cannot be parsed");
  const std::string difference = model_difference(saved.model(), resolved.model());
  if (!difference.empty())
    return failed_precondition("checkpoint " + dir + " was written for another model config (first difference: " +
                               difference + "); resume it with the config it was trained with, or start a new run");
  if (man.world_size() != 1)
    return failed_precondition("checkpoint " + dir + " was written by " + std::to_string(man.world_size()) +
                               " ranks; this run has 1");
  std::map<std::string, const config::TensorRecord*> records;
  for (const auto& r : man.tensor()) records[r.name()] = &r;
  std::map<std::string, data::Hdf5File> files;
  NoGradGuard ng;
  for (const auto& [name, t] : checkpoint_tensors(model, optimizer)) {
    auto it = records.find(name);
    if (it == records.end()) return data_loss("checkpoint " + dir + ": tensor " + name + " is missing");
    const config::TensorRecord& rec = *it->second;
    const Shape shape(rec.shape().begin(), rec.shape().end());
    if (shape != t.shape() || rec.dtype() != dtype_name(t.dtype()))
      return data_loss("checkpoint " + dir + ": tensor " + name + " is " + rec.dtype() + " " + shape_str(shape) +
                       ", this model has " + std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()));
    if (!files.count(rec.file())) {
      auto f = data::Hdf5File::open_read((fs::path(dir) / rec.file()).string());
      if (!f.ok()) return f.status().with_context("checkpoint " + dir);
      files.emplace(rec.file(), std::move(*f));
    }
    Tensor host = Tensor::empty(t.shape(), t.dtype());
    const Status st = files.at(rec.file()).read(name, h5_type(t.dtype()), host.raw_data());
    if (!st.ok()) return st.with_context("checkpoint " + dir);
    if (crc32c(host.raw_data(), static_cast<std::size_t>(host.nbytes())) != rec.crc32c())
      return data_loss("checkpoint " + dir + ": tensor " + name + " fails its checksum (the file is damaged)");
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

}  // namespace hydra::trainer
