// Thin RAII wrappers over the HDF5 C API, with every call checked and errors as Status naming the
// file and the dataset. Used for token shards (data/) and checkpoints (trainer/).
//
// Threads: the HDF5 we link (Debian's, built for MPI) is not thread-safe, and the data loader reads
// shards on its prefetch thread while the main thread evaluates or writes a checkpoint. Every HDF5
// call made through this file (handle closes included) holds one process-wide lock, and callers
// name element types by Hdf5Type instead of HDF5's own globals, so no HDF5 call happens outside it.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "base/status.h"

namespace hydra::data {

// The lock every HDF5 call holds (recursive: wrappers call wrappers).
std::unique_lock<std::recursive_mutex> hdf5_lock();

// Element types of datasets, in memory (converted from what is stored where they differ).
enum class Hdf5Type { kF32, kF64, kI32, kI64, kU16, kU32 };

class Hdf5Handle {
 public:
  Hdf5Handle() = default;
  Hdf5Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~Hdf5Handle() { reset(); }
  Hdf5Handle(Hdf5Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  Hdf5Handle& operator=(Hdf5Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      close_ = o.close_;
      o.id_ = -1;
    }
    return *this;
  }
  Hdf5Handle(const Hdf5Handle&) = delete;
  Hdf5Handle& operator=(const Hdf5Handle&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset();

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

// An open HDF5 file. Writers create `path` directly (callers write to a temporary name and rename).
class Hdf5File {
 public:
  static Expected<Hdf5File> create(const std::string& path);
  static Expected<Hdf5File> open_read(const std::string& path);
  const std::string& path() const { return path_; }

  // 1-D or N-D datasets, written whole.
  Status write(const std::string& name, Hdf5Type type, const std::vector<int64_t>& shape,
               const void* data);
  bool has(const std::string& name) const;
  Expected<std::vector<int64_t>> shape(const std::string& name) const;
  // The whole dataset, converted to `type`.
  Status read(const std::string& name, Hdf5Type type, void* out) const;
  // Elements [offset, offset + count) of a 1-D dataset.
  Status read_range(const std::string& name, Hdf5Type type, int64_t offset, int64_t count,
                    void* out) const;
  // Size in bytes of the stored element type.
  Expected<int64_t> element_size(const std::string& name) const;

  Status write_attr(const std::string& name, const std::string& value);
  Status write_attr(const std::string& name, int64_t value);
  Expected<std::string> read_attr_string(const std::string& name) const;
  Expected<int64_t> read_attr_int(const std::string& name) const;
  Status flush();

 private:
  std::string path_;
  Hdf5Handle file_;
};

// Turns off HDF5's own error printing (we report errors ourselves). Idempotent.
void quiet_hdf5();

}  // namespace hydra::data
