// The bf16 kernels of ops/cpu_kernels.cpp against the LibTorch ops they replace, on the
// ViT-B/16 step's shapes at batch 8 (issue 8): per op the median time of each (ms), their
// ratio, and the largest difference between the two results (in bf16 ulps of the result's
// magnitude, i.e. relative to max |reference|). Runs the pair alternately, `rounds` times.
//
//   cmake --build build --target shardtune_kernels_ab
//   OMP_NUM_THREADS=2 build/shardtune_kernels_ab [rounds=50]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common/runtime.h"
#include "ops/cpu_kernels.h"

using namespace shardtune;

namespace {

double median_ms(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times `ref` and `fast` alternately; prints medians and the results' largest difference.
void compare(const std::string& name, int rounds, const std::function<torch::Tensor()>& ref,
             const std::function<torch::Tensor()>& fast) {
  std::vector<double> tr, tf;
  auto time = [](const std::function<torch::Tensor()>& f, std::vector<double>& out) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    out.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  };
  for (int i = 0; i < 3; ++i) ref(), fast();
  for (int i = 0; i < rounds; ++i) time(ref, tr), time(fast, tf);
  torch::Tensor a = ref().to(torch::kFloat), b = fast().to(torch::kFloat);
  const double scale = a.abs().max().item<double>();
  const double diff = (a - b).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
  std::printf("%-26s libtorch %7.3f ms   kernel %7.3f ms   ratio %.2f   max diff %.2e of max|ref|\n", name.c_str(),
              median_ms(tr), median_ms(tf), median_ms(tf) / median_ms(tr), diff);
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 50;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("rounds=", 0) == 0) rounds = std::stoi(a.substr(7));
    else {
      std::fprintf(stderr, "usage: %s [rounds=R]\n", argv[0]);
      return 2;
    }
  }
  configure_runtime();
  if (!kernels::available()) {
    std::fprintf(stderr, "this CPU has no AVX-512 BF16: the kernels are off, nothing to compare\n");
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const auto bf = torch::kBFloat16, f32 = torch::kFloat;
  const int64_t B = 8, N = 197, H = 12, D = 768, F = 3072;
  std::printf("threads %d, rounds %d, ViT-B/16 shapes at batch %lld\n", torch::get_num_threads(), rounds,
              static_cast<long long>(B));

  torch::Tensor scores = (torch::randn({B, H, N, N}) * 3).to(bf);
  torch::Tensor probs = scores.softmax(-1), dprobs = torch::randn({B, H, N, N}).to(bf);
  compare("softmax [8,12,197,197]", rounds, [&] { return scores.softmax(-1); },
          [&] { return kernels::softmax_lastdim(scores); });
  // The attention scale: LibTorch's path scales q (a pass over it) before the scores; the
  // kernel scales the scores on the fly.
  torch::Tensor q = torch::randn({B, H, N, 64}).to(bf), scaled_scores = scores * 0.125;
  compare("q * scale, softmax", rounds,
          [&] {
            torch::Tensor qs = q * 0.125;
            return scaled_scores.softmax(-1);
          },
          [&] { return kernels::softmax_lastdim(scores, 0.125); });
  compare("softmax backward", rounds, [&] { return torch::_softmax_backward_data(dprobs, probs, -1, bf); },
          [&] { return kernels::softmax_lastdim_backward(probs, dprobs); });

  torch::Tensor x = (torch::randn({B, N, D}) * 2 + 0.5).to(bf), dy = torch::randn({B, N, D}).to(bf);
  torch::Tensor w = torch::rand({D}) + 0.5, b = torch::randn({D});
  // The reference is what vit.cpp did before the kernel: fp32 casts around LibTorch's kernel.
  auto ln_ref = [&] { return torch::native_layer_norm(x.to(f32), {D}, w, b, 1e-6); };
  compare("layer_norm [8,197,768]", rounds, [&] { return std::get<0>(ln_ref()).to(bf); },
          [&] { return std::get<0>(kernels::layer_norm(x, w, b, 1e-6)); });
  auto [y0, mean, rstd] = ln_ref();
  compare("layer_norm backward (dx)", rounds,
          [&] {
            return std::get<0>(torch::native_layer_norm_backward(dy.to(f32), x.to(f32), {D}, mean, rstd, w, b,
                                                                 {true, false, false}))
                .to(bf);
          },
          [&] { return kernels::layer_norm_backward(dy, x, w, mean.view({-1}), rstd.view({-1}), false, false).dx; });

  torch::Tensor x2 = torch::randn({B, N, D}).to(bf);
  compare("residual add [8,197,768]", rounds, [&] { return x + x2; }, [&] { return kernels::add(x, x2); });

  torch::Tensor h = torch::randn({B, N, F}).to(bf), hb = torch::randn({F}).to(bf);
  torch::Tensor dh = torch::randn({B, N, F}).to(bf);
  compare("gelu [8,197,3072]", rounds, [&] { return torch::gelu(h); }, [&] { return kernels::gelu(h); });
  compare("gelu backward", rounds, [&] { return torch::gelu_backward(dh, h); },
          [&] { return kernels::gelu_backward(dh, h); });
  torch::Tensor h1 = h.clone(), h2 = h.clone();
  compare("bias add_ [8,197,3072]", rounds, [&] { return h1.add_(hb); },
          [&] { kernels::add_bias_(h2, hb); return h2; });
  return 0;
}
