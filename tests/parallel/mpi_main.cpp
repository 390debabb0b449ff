// main() for GoogleTest binaries that run under mpirun: MPI starts before the tests and stops
// after; only rank 0 prints the usual report (every rank's failures are printed, prefixed by their
// rank).
#include <gtest/gtest.h>

#include <iostream>

#include "parallel/runtime.h"

namespace {

class RankPrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankPrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (r.failed())
      std::cerr << "rank " << rank_ << ": " << (r.file_name() ? r.file_name() : "?") << ":"
                << r.line_number() << ": " << r.summary() << std::endl;
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  const auto& info = hydra::parallel::init_processes(&argc, &argv, /*force=*/true);
  if (info.rank != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankPrinter(info.rank));
  }
  const int rc = RUN_ALL_TESTS();
  hydra::parallel::finalize_processes();
  return rc;
}
