#include "autograd/grad_mode.h"

namespace hydra {
namespace {
thread_local bool grad_enabled = true;
}  // namespace

bool GradMode::enabled() { return grad_enabled; }
void GradMode::set_enabled(bool enabled) { grad_enabled = enabled; }

}  // namespace hydra
