// Serving an attnkern AOTInductor package from C++, without a Python interpreter.
//
//   attnkern export --format aoti --model target_attention_ctr --out ctr.pt2
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++20 -O2 serve_aoti.cpp -I$T/include -I$T/include/torch/csrc/api/include \
//       -L$T/lib -Wl,-rpath,$T/lib -ltorch -ltorch_cpu -lc10 -o serve_aoti
//   LD_LIBRARY_PATH=$T/lib LD_PRELOAD=$(python -c "import sysconfig, os; \
//       print(os.path.join(sysconfig.get_config_var('LIBDIR'), sysconfig.get_config_var('INSTSONAME')))") \
//       ./serve_aoti ctr.pt2 $(python -c "import attnkern.tools.export as e; print(e.op_library())") 2 5 11
//
// What it needs: torch's libraries (libtorch, libtorch_cpu, libc10; LD_LIBRARY_PATH lets the
// package's own .so find them), the package, and attnkern's op library loaded before the
// package runs (its TORCH_LIBRARY registrations put attnkern::* in the dispatcher, which the
// package calls). attnkern/_C*.so is also the Python module, so its Python C-API symbols must
// resolve: libpython's shared library is preloaded for that, no interpreter is started.
//
// Inputs (B users, N candidates, L history): deterministic ids, row 0 full, row 1 empty, so
// that a test can compare the printed logits with eager.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: serve_aoti PACKAGE.pt2 ATTNKERN_OP_LIBRARY.so B N L\n";
    return 2;
  }
  if (dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load attnkern's op library: " << dlerror() << "\n";
    return 1;
  }
  const int64_t B = std::atoll(argv[3]), N = std::atoll(argv[4]), L = std::atoll(argv[5]);
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);

  auto history = (torch::arange(B * L, torch::kLong).reshape({B, L}) % 40) + 1;
  auto target = (torch::arange(B * N, torch::kLong).reshape({B, N}) * 7 % 40) + 1;
  auto lengths = torch::full({B}, L / 2 + 1, torch::kLong);
  lengths[0] = L;
  if (B > 1) lengths[1] = 0;

  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> out = loader.run({history, target, lengths});  // flat inputs
  auto logits = out[0].contiguous();
  const float* p = logits.data_ptr<float>();
  for (int64_t i = 0; i < logits.numel(); ++i) std::printf("%.9g\n", p[i]);
  return 0;
}
