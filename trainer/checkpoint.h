// Checkpoints: a directory per step
//   DIR/checkpoints/step-00000020/rank-00000.h5   the tensors world rank 0 owns, by global name
//   DIR/checkpoints/step-00000020/rank-00002.h5   ... another rank's (an expert shard of its ep
//   rank) DIR/checkpoints/step-00000020/manifest.pb     CheckpointManifest, written last by rank 0
// Every parameter, optimizer state and buffer is written once: replicated tensors by rank 0, each
// ep rank's expert shard by the rank of that shard with dp = sp = 0. Each record names its file,
// its slice (offset along the first dimension, full shape) and its CRC32C. The directory is written
// under a .tmp name and renamed into place after every rank has written, so a checkpoint without a
// manifest never appears. Loading checks the model config and every shape, dtype and checksum, and
// assembles each tensor's slice from whatever records cover it: a run may resume on another grid
// (resharding).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "autograd/random.h"
#include "configs/hydra.pb.h"
#include "model/lm.h"
#include "parallel/grid.h"
#include "trainer/optimizer.h"

namespace hydra::trainer {

struct TrainState {
  int64_t step = 0;  // steps completed
  int64_t stage = 0;
  GeneratorState rng;
  uint64_t data_seed = 0;
  double tokens_seen = 0, elapsed_s = 0;
};

class CheckpointManager {
 public:
  CheckpointManager(const std::string& run_dir, int64_t keep_last);
  // Joins a write still running; its temporary directory stays (the next publish removes it).
  ~CheckpointManager();
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;
  std::string checkpoint_dir(int64_t step) const;

  // Writes the checkpoint of state.step (every rank calls it); then keeps the newest keep_last.
  // Returns its directory (the same status on every rank). begin_save, then finish_save.
  Expected<std::string> save(const TrainState& state, const config::RunConfig& resolved,
                             const model::LanguageModel& model, const AdamW& optimizer,
                             const parallel::ProcessGrid& grid);
  // A save in two parts, so that training goes on while the files are written. begin_save (every
  // rank): the temporary directory (the ranks agree it exists), then this rank's tensors copied to
  // host memory, the only part that holds training up; a background thread writes them and their
  // checksums into the rank's file. One save at a time: a save still running is finished first.
  struct Snapshot {
    double bytes = 0;       // this rank's tensors copied to host memory
    double copy_s = 0;      // the copies
    double alloc_s = 0;     // host buffers set up (the first save, or when shapes change), or
                            // waited for (prepare_staging still at work)
    int64_t allocated = 0;  // buffers set up by this save (not kept, not prepared)
    double waited_s = 0;    // the previous save still being written, finished first
  };
  Expected<Snapshot> begin_save(const TrainState& state, const config::RunConfig& resolved,
                                const model::LanguageModel& model, const AdamW& optimizer,
                                const parallel::ProcessGrid& grid);
  // Sets up, on a thread of its own, the host buffers the next save will copy this rank's tensors
  // into (page-locked for GPU tensors: about a second a GB, which the first save otherwise spends
  // holding training up). Call once the tensors exist (after the first optimizer step); begin_save
  // waits for it if it is still at work.
  void prepare_staging(const model::LanguageModel& model, const AdamW& optimizer,
                       const parallel::ProcessGrid& grid);
  bool saving() const { return pending_ != nullptr; }  // begun, not yet finished
  bool written() const;  // this rank's background write has ended (well or not)

  // Waits for this rank's write, then publishes as save always has (every rank calls it): the
  // ranks agree every file is written, rank 0 writes the manifest last and renames the directory
  // into place, then keeps the newest keep_last. Nothing is published if any rank failed.
  Expected<std::string> finish_save(const parallel::ProcessGrid& grid);
  // Newest complete checkpoint (with a manifest) under run_dir, or not_found; with `before` >= 0,
  // the newest of a step below `before` (what to offer when the newest is damaged).
  Expected<std::string> latest(int64_t before = -1) const;
  // The checkpoint folders (complete or not) of steps above `step`, oldest first.
  std::vector<std::string> newer_than(int64_t step) const;
  // The step of a checkpoint folder's name (step-NNNNNNNN), or -1.
  static int64_t step_of_dir(const std::string& dir);
  // DIR/manifest.pb, checked: its checksum (format 2), then every field within what a writer
  // produces (sizes, slices, file names); a damaged one is a data_loss naming the checkpoint.
  static Expected<config::CheckpointManifest> read_manifest(const std::string& dir);
  // Writes `man` as DIR/manifest.pb in the current format (its CRC32C encoded last), synced.
  static Status write_manifest(const std::string& dir, config::CheckpointManifest man);
  // Restores model, optimizer and state from `dir`, after checking it matches `resolved`'s model.
  static Status load(const std::string& dir, const config::RunConfig& resolved,
                     model::LanguageModel& model, AdamW& optimizer, TrainState* state,
                     const parallel::ProcessGrid& grid);

 private:
  struct Pending;
  std::string root_;
  int64_t keep_last_;
  std::unique_ptr<Pending> pending_;
  // Host copies of the tensors a save writes, kept from save to save (page-locked for GPU tensors:
  // the copy that holds training up runs at the link's speed).
  std::map<std::string, Tensor> staging_;
  std::thread preparing_;                   // prepare_staging's thread
  std::map<std::string, Tensor> prepared_;  // its buffers, moved into staging_ by begin_save
  void take_prepared(Snapshot* snap);
};

// A checkpoint read without a model (hydra-ckpt): each tensor the manifest lists, whole, with the
// records that hold its parts.
struct StoredTensor {
  std::string name;  // "param/...", "adam_m/...", "adam_v/...", "buffer/..."
  Shape shape;       // of the whole tensor
  DType dtype = DType::kF32;
  std::vector<const config::TensorRecord*> records;  // into the manifest
};
// The manifest's tensors in the order it lists them; an error when its records disagree.
Expected<std::vector<StoredTensor>> stored_tensors(const config::CheckpointManifest& man,
                                                   const std::string& dir);
// Reads whole tensors of the checkpoint in `dir` onto the host, every record's size and checksum
// checked and every element covered exactly once; each rank file is opened once.
class StoredTensorReader {
 public:
  explicit StoredTensorReader(std::string dir);
  ~StoredTensorReader();
  StoredTensorReader(const StoredTensorReader&) = delete;
  StoredTensorReader& operator=(const StoredTensorReader&) = delete;
  Expected<Tensor> read(const StoredTensor& t);

 private:
  struct Files;
  std::string dir_;
  std::unique_ptr<Files> files_;
};

}  // namespace hydra::trainer
