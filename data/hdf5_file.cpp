#include "data/hdf5_file.h"

#include <algorithm>
#include <filesystem>

namespace hydra::data {

std::unique_lock<std::recursive_mutex> hdf5_lock() {
  static std::recursive_mutex mu;
  return std::unique_lock<std::recursive_mutex>(mu);
}

namespace {

hid_t native(Hdf5Type t) {  // call with the lock held (the H5T_NATIVE_* macros are HDF5 calls)
  switch (t) {
    case Hdf5Type::kF32:
      return H5T_NATIVE_FLOAT;
    case Hdf5Type::kF64:
      return H5T_NATIVE_DOUBLE;
    case Hdf5Type::kI32:
      return H5T_NATIVE_INT32;
    case Hdf5Type::kI64:
      return H5T_NATIVE_INT64;
    case Hdf5Type::kU16:
      return H5T_NATIVE_UINT16;
    case Hdf5Type::kU32:
      return H5T_NATIVE_UINT32;
  }
  return H5T_NATIVE_FLOAT;
}

}  // namespace

void Hdf5Handle::reset() {
  if (id_ >= 0 && close_ != nullptr) {
    const auto lock = hdf5_lock();
    close_(id_);
  }
  id_ = -1;
}

void quiet_hdf5() {
  const auto lock = hdf5_lock();
  static const bool done = [] {
    // No cleanup at exit: after a close that failed (a full disk while HDF5 flushed the file),
    // HDF5's own atexit handler closes that file again and crashes (H5F__close_cb). Every file is
    // closed by its handle before then; what HDF5 would free at exit the process gives back anyway.
    // Must come before the library initialises (the next call does).
    H5dont_atexit();
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

Expected<Hdf5File> Hdf5File::create(const std::string& path) {
  const auto lock = hdf5_lock();
  quiet_hdf5();
  // The 1.8 file format or later: its superblock and object headers carry checksums, so a damaged
  // file is refused when its metadata is read instead of parsed (the earliest format, HDF5's
  // default, has none: a fuzzed shard made libhdf5 read freed memory under AddressSanitizer).
  Hdf5Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (!fapl.valid() || H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST) < 0)
    return io_error(path + ": cannot set up the HDF5 file's format");
  const hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get());
  if (f < 0) return io_error(path + ": cannot create the HDF5 file (is the folder writable?)");
  Hdf5File out;
  out.path_ = path;
  out.file_ = Hdf5Handle(f, H5Fclose);
  return out;
}

Expected<Hdf5File> Hdf5File::open_read(const std::string& path) {
  const auto lock = hdf5_lock();
  quiet_hdf5();
  if (!std::filesystem::exists(path)) return not_found(path + ": no such file");
  if (H5Fis_hdf5(path.c_str()) <= 0)
    return data_loss(path + ": not an HDF5 file (truncated or of another kind)");
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return data_loss(path + ": cannot open the HDF5 file (truncated or damaged?)");
  Hdf5File out;
  out.path_ = path;
  out.file_ = Hdf5Handle(f, H5Fclose);
  return out;
}

Status Hdf5File::write(const std::string& name, Hdf5Type type, const std::vector<int64_t>& shape,
                       const void* data) {
  auto lock = hdf5_lock();
  const std::vector<hsize_t> dims =
      shape.empty() ? std::vector<hsize_t>{1} : std::vector<hsize_t>(shape.begin(), shape.end());
  Hdf5Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  if (!space.valid()) return io_error(path_ + ": cannot describe dataset " + name);
  Hdf5Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  const hid_t mem_type = native(type);
  Hdf5Handle ds(H5Dcreate2(file_.get(), name.c_str(), mem_type, space.get(), lcpl.get(),
                           H5P_DEFAULT, H5P_DEFAULT),
                H5Dclose);
  if (!ds.valid()) return io_error(path_ + ": cannot create dataset " + name);
  // Slabs of whole rows of at most kSlabBytes, the lock released between them: a large tensor
  // written by a background checkpoint does not hold up the data loader's reads for its whole
  // write. (HDF5 serializes every call: the library is not thread-safe.)
  constexpr hsize_t kSlabBytes = hsize_t{64} << 20;
  const hsize_t elem = H5Tget_size(mem_type), rows = dims[0];
  hsize_t row_elems = 1;
  for (std::size_t d = 1; d < dims.size(); ++d) row_elems *= dims[d];
  const hsize_t step = std::max<hsize_t>(1, kSlabBytes / std::max<hsize_t>(1, row_elems * elem));
  for (hsize_t r0 = 0; r0 < rows; r0 += step) {
    if (r0 > 0) lock.lock();
    std::vector<hsize_t> start(dims.size(), 0), count = dims;
    start[0] = r0;
    count[0] = std::min(step, rows - r0);
    Hdf5Handle file_space(H5Dget_space(ds.get()), H5Sclose);
    Hdf5Handle mem_space(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr),
                         H5Sclose);
    if (!file_space.valid() || !mem_space.valid() ||
        H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(),
                            nullptr) < 0)
      return io_error(path_ + ": cannot select rows of dataset " + name);
    const auto* rows_at = static_cast<const char*>(data) + r0 * row_elems * elem;
    if (H5Dwrite(ds.get(), mem_type, mem_space.get(), file_space.get(), H5P_DEFAULT, rows_at) < 0)
      return io_error(path_ + ": cannot write dataset " + name + " (disk full?)");
    file_space.reset();
    mem_space.reset();
    if (r0 + step < rows) lock.unlock();
  }
  return ok_status();
}

bool Hdf5File::has(const std::string& name) const {
  const auto lock = hdf5_lock();
  return H5Lexists(file_.get(), name.c_str(), H5P_DEFAULT) > 0;
}

Expected<std::vector<int64_t>> Hdf5File::shape(const std::string& name) const {
  const auto lock = hdf5_lock();
  if (!has(name)) return data_loss(path_ + ": dataset " + name + " is missing");
  Hdf5Handle ds(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!ds.valid()) return data_loss(path_ + ": cannot open dataset " + name);
  Hdf5Handle space(H5Dget_space(ds.get()), H5Sclose);
  const int n = H5Sget_simple_extent_ndims(space.get());
  if (n < 0) return data_loss(path_ + ": dataset " + name + " has no readable shape");
  std::vector<hsize_t> dims(n);
  H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

Status Hdf5File::read(const std::string& name, Hdf5Type type, void* out) const {
  const auto lock = hdf5_lock();
  Hdf5Handle ds(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!ds.valid()) return data_loss(path_ + ": dataset " + name + " is missing");
  if (H5Dread(ds.get(), native(type), H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
    return data_loss(path_ + ": cannot read dataset " + name + " (truncated or damaged file?)");
  return ok_status();
}

Status Hdf5File::read_range(const std::string& name, Hdf5Type type, int64_t offset, int64_t count,
                            void* out) const {
  const auto lock = hdf5_lock();
  Hdf5Handle ds(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!ds.valid()) return data_loss(path_ + ": dataset " + name + " is missing");
  Hdf5Handle space(H5Dget_space(ds.get()), H5Sclose);
  const hsize_t start = static_cast<hsize_t>(offset), n = static_cast<hsize_t>(count);
  if (H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, &start, nullptr, &n, nullptr) < 0)
    return data_loss(path_ + ": range [" + std::to_string(offset) + ", " +
                     std::to_string(offset + count) + ") outside dataset " + name);
  Hdf5Handle mem(H5Screate_simple(1, &n, nullptr), H5Sclose);
  if (H5Dread(ds.get(), native(type), mem.get(), space.get(), H5P_DEFAULT, out) < 0)
    return data_loss(path_ + ": cannot read " + name + " at " + std::to_string(offset) +
                     " (truncated file?)");
  return ok_status();
}

Expected<int64_t> Hdf5File::element_size(const std::string& name) const {
  const auto lock = hdf5_lock();
  Hdf5Handle ds(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!ds.valid()) return data_loss(path_ + ": dataset " + name + " is missing");
  Hdf5Handle t(H5Dget_type(ds.get()), H5Tclose);
  return static_cast<int64_t>(H5Tget_size(t.get()));
}

Status Hdf5File::write_attr(const std::string& name, const std::string& value) {
  const auto lock = hdf5_lock();
  Hdf5Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), value.empty() ? 1 : value.size());
  Hdf5Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Hdf5Handle attr(
      H5Acreate2(file_.get(), name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
      H5Aclose);
  if (!attr.valid() || H5Awrite(attr.get(), type.get(), value.empty() ? "" : value.data()) < 0)
    return io_error(path_ + ": cannot write attribute " + name);
  return ok_status();
}

Status Hdf5File::write_attr(const std::string& name, int64_t value) {
  const auto lock = hdf5_lock();
  Hdf5Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Hdf5Handle attr(H5Acreate2(file_.get(), name.c_str(), H5T_NATIVE_INT64, space.get(), H5P_DEFAULT,
                             H5P_DEFAULT),
                  H5Aclose);
  if (!attr.valid() || H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) < 0)
    return io_error(path_ + ": cannot write attribute " + name);
  return ok_status();
}

Expected<std::string> Hdf5File::read_attr_string(const std::string& name) const {
  const auto lock = hdf5_lock();
  if (H5Aexists(file_.get(), name.c_str()) <= 0)
    return data_loss(path_ + ": attribute " + name + " is missing");
  Hdf5Handle attr(H5Aopen(file_.get(), name.c_str(), H5P_DEFAULT), H5Aclose);
  Hdf5Handle type(H5Aget_type(attr.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_STRING)
    return data_loss(path_ + ": attribute " + name + " is not a string");
  const std::size_t n = H5Tget_size(type.get());
  std::string s(n, '\0');
  if (H5Aread(attr.get(), type.get(), s.data()) < 0)
    return data_loss(path_ + ": cannot read attribute " + name);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

Expected<int64_t> Hdf5File::read_attr_int(const std::string& name) const {
  const auto lock = hdf5_lock();
  if (H5Aexists(file_.get(), name.c_str()) <= 0)
    return data_loss(path_ + ": attribute " + name + " is missing");
  Hdf5Handle attr(H5Aopen(file_.get(), name.c_str(), H5P_DEFAULT), H5Aclose);
  int64_t v = 0;
  if (H5Aread(attr.get(), H5T_NATIVE_INT64, &v) < 0)
    return data_loss(path_ + ": cannot read attribute " + name);
  return v;
}

Status Hdf5File::flush() {
  const auto lock = hdf5_lock();
  if (H5Fflush(file_.get(), H5F_SCOPE_GLOBAL) < 0)
    return io_error(path_ + ": flush failed (disk full?)");
  return ok_status();
}

}  // namespace hydra::data
