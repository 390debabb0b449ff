#include "trainer/schedule.h"

#include <algorithm>
#include <cmath>

namespace hydra::trainer {

double scheduled_lr(const config::LrSchedule& s, int64_t step, int64_t total) {
  const double lr = s.lr();
  const int64_t warm = std::max<int64_t>(0, std::min(s.warmup_steps(), total));
  if (step < warm) return lr * double(step + 1) / double(warm);
  if (s.kind() == config::LrSchedule::CONSTANT) return lr;
  const int64_t span = std::max<int64_t>(1, total - warm);
  const double progress = std::clamp(double(step - warm) / double(span), 0.0, 1.0);
  const double floor = lr * s.min_lr_ratio();
  if (s.kind() == config::LrSchedule::LINEAR) return lr - (lr - floor) * progress;
  return floor + (lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

}  // namespace hydra::trainer
