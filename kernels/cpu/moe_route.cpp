#include "kernels/moe_route.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

template <class T>
void route_impl(const MoeRouteParams& p) {
  const int64_t rows = p.batch * p.chunks, E = p.experts, c = p.chunk_len, L = p.chunks * c;
  const T *r = static_cast<const T*>(p.r), *s = static_cast<const T*>(p.s);
  T* mask = static_cast<T*>(p.mask);
  const int64_t capacity = p.capacity > 0 ? p.capacity : rows + 1;
  std::vector<int64_t> order(E);
  std::fill(p.counts, p.counts + E, 0);
  std::fill(p.dropped, p.dropped + E, 0);
  std::fill(mask, mask + rows * E, T(0));
  for (int64_t row = 0; row < rows; ++row) {
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return r[row * E + a] > r[row * E + b]; });
    int64_t kept = 0;
    for (int64_t e : order) {
      if (kept == p.max_active || !(s[row * E + e] > 0)) break;
      ++kept;
      if (p.counts[e] >= capacity) {
        ++p.dropped[e];
        continue;
      }
      ++p.counts[e];
      mask[row * E + e] = T(1);
    }
  }
  const int64_t K = std::min(p.max_active, E);
  std::vector<int64_t> filled;
  if (p.inverse) {
    std::fill(p.inverse, p.inverse + rows * c * K, int64_t{-1});
    filled.assign(rows * c, 0);
  }
  if (p.tile > 0) {  // padding rows: token 0, the pair past the last; tiles past the groups: -1
    std::fill(p.perm, p.perm + moe_route_slots(p), int64_t{0});
    std::fill(p.widx, p.widx + moe_route_slots(p), rows * E);
    std::fill(p.tiles, p.tiles + moe_route_tiles(p), int64_t{-1});
    for (int64_t e = 0; e < E; ++e) {
      const int64_t start = moe_route_group_start(p, p.counts, e);
      const int64_t n = (p.counts[e] * c + p.tile - 1) / p.tile;
      std::fill(p.tiles + start / p.tile, p.tiles + start / p.tile + n, e);
    }
  }
  int64_t i = 0;
  for (int64_t e = 0; e < E; ++e) {
    i = moe_route_group_start(p, p.counts, e);
    for (int64_t row = 0; row < rows; ++row) {
      if (mask[row * E + e] == T(0)) continue;
      const int64_t b = row / p.chunks, j = row % p.chunks;
      for (int64_t t = 0; t < c; ++t, ++i) {
        p.perm[i] = b * L + j * c + t;
        p.widx[i] = row * E + e;
        if (p.inverse) p.inverse[p.perm[i] * K + filled[p.perm[i]]++] = i;
      }
    }
  }
}

}  // namespace

void moe_route(const MoeRouteParams& p) {
  dispatch_float(p.dtype, "moe_route",
                 [&](auto tag) { route_impl<typename decltype(tag)::type>(p); });
}

}  // namespace hydra::kernels::cpu
