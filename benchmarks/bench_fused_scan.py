"""Tried and not kept (docs/performance.md, "What predictions cost"): a fused C++ scan of one [512, 4096] float32 block
that takes the largest logit of each group of 128 columns and counts the logits at least a per-row threshold in one
read of each row, built with torch.utils.cpp_extension.load_inline (-O3 -march=native; about 50 s to compile the first
time, needs ninja and a C++ compiler), against the eager PyTorch operations it would replace. Prints ms per call.

    python benchmarks/bench_fused_scan.py
"""
import time

import torch
from torch.utils.cpp_extension import load_inline

src = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
static inline int32_t count_ge(const float* z, int64_t len, float t) {
  int32_t c = 0;
  for (int64_t j = 0; j < len; ++j) c += z[j] >= t;
  return c;
}
static inline float max_of(const float* z, int64_t len) {
  float m = z[0];
  for (int64_t j = 1; j < len; ++j) m = std::max(m, z[j]);
  return m;
}
torch::Tensor only_count(torch::Tensor z, torch::Tensor low) {
  const int64_t n = z.size(0), v = z.size(1);
  auto out = torch::empty({n}, torch::kInt64);
  const float* zp = z.data_ptr<float>(); const float* lp = low.data_ptr<float>(); int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) { for (int64_t r = b; r < e; ++r) op[r] = count_ge(zp + r * v, v, lp[r]); });
  return out;
}
torch::Tensor only_max(torch::Tensor z, int64_t width) {
  const int64_t n = z.size(0), v = z.size(1), g = v / width;
  auto out = torch::empty({n, g}, z.options());
  const float* zp = z.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) { for (int64_t r = b; r < e; ++r) for (int64_t k = 0; k < g; ++k) op[r * g + k] = max_of(zp + r * v + k * width, width); });
  return out;
}
std::tuple<torch::Tensor, torch::Tensor> fused(torch::Tensor z, torch::Tensor low, int64_t width) {
  const int64_t n = z.size(0), v = z.size(1), g = v / width;
  auto out = torch::empty({n, g}, z.options()); auto cnt = torch::empty({n}, torch::kInt64);
  const float* zp = z.data_ptr<float>(); const float* lp = low.data_ptr<float>(); float* op = out.data_ptr<float>(); int64_t* cp = cnt.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) { for (int64_t r = b; r < e; ++r) {
    int32_t c = 0; const float t = lp[r];
    for (int64_t k = 0; k < g; ++k) { const float* zg = zp + r * v + k * width; op[r * g + k] = max_of(zg, width); c += count_ge(zg, width, t); }
    cp[r] = c; } });
  return {out, cnt};
}
'''
t0 = time.time()
mod = load_inline("ipolicy_fused_scan_tried", cpp_sources=src, functions=["only_count", "only_max", "fused"], extra_cflags=["-O3", "-march=native", "-fno-signed-zeros", "-ffinite-math-only", "-fno-trapping-math", "-funroll-loops", "-fvariable-expansion-in-unroller", "-mprefer-vector-width=512"], verbose=False)
print("compile", time.time() - t0)
n, v = 512, 4096
z = torch.randn(n, v) * 3; low = z[:, 7].clone()
def bench(name, f, reps=300):
    for _ in range(10): f()
    t0 = time.perf_counter()
    for _ in range(reps): f()
    print(f"{name:40s} {(time.perf_counter()-t0)/reps*1e3:.3f} ms")
print(torch.equal(mod.only_count(z, low), (z >= low[:, None]).sum(-1)), torch.equal(mod.only_max(z, 128), z.view(n, -1, 128).amax(-1)))
a, b = mod.fused(z, low, 128); print(torch.equal(a, z.view(n, -1, 128).amax(-1)), torch.equal(b, (z >= low[:, None]).sum(-1)))
bench("only_count", lambda: mod.only_count(z, low))
bench("only_max", lambda: mod.only_max(z, 128))
bench("fused", lambda: mod.fused(z, low, 128))
bench("amax groups", lambda: z.view(n, -1, 128).amax(-1))
bench("amax", lambda: z.amax(-1))
