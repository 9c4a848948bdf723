// Fused elementwise CPU kernels (fused.py): passes over activations that PyTorch would make one op at a time.
//
// 1. The neural memory's short causal depthwise conv with the SiLU after it:
//   pre[b, t, c] = sum_{j = 0..min(K - 1, since[b, t])} seq[b, t + K - 1 - j, c] * w[K - 1 - j, c]
//   out = silu(pre)
//
// seq (B, T + K - 1, C) is the previous call's K - 1 tail followed by this call's T tokens; w (K, C), row K - 1 the
// current token's tap; since (B, T) int64 (tokens since the token's document start, >= K where none; empty: none)
// drops the taps that reach before a document start. The forward is one pass over the rows (vectorised over C);
// the backward one pass per block of channels, each block's tap gradients private to its thread.
//
// 2. SwiGLU's gating: gu (R, 2H) = [gate | up] (the fused w13 projection), out (R, H) = silu(gate) * up; backward
// d gu = [d out * up * silu'(gate) | d out * silu(gate)], one pass each way.

#include "cpu_capability.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

inline int taps(const int64_t* since, int64_t row, int K) {
  return since ? (int)std::min<int64_t>(K - 1, since[row]) : K - 1;
}

template <typename T>
void forward_impl(const T* seq, const T* w, const int64_t* since, T* pre, T* out, int64_t B, int64_t T_, int64_t C,
                  int K) {
  using V = Vectorized<T>;
  at::parallel_for(0, B * T_, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const int64_t b = r / T_, t = r % T_;
      const T* x = seq + (b * (T_ + K - 1) + t + K - 1) * C;  // the current token's row; tap j is j rows back
      const int lim = taps(since, r, K);
      T* p = pre + r * C;
      T* o = out + r * C;
      int64_t c = 0;
      for (; c + V::size() <= C; c += V::size()) {
        V acc = V::loadu(x + c) * V::loadu(w + (K - 1) * C + c);
        for (int j = 1; j <= lim; j++) acc = at::vec::fmadd(V::loadu(x - j * C + c), V::loadu(w + (K - 1 - j) * C + c), acc);
        acc.store(p + c);
        (acc / (V(T(1)) + acc.neg().exp())).store(o + c);
      }
      for (; c < C; c++) {
        T acc = x[c] * w[(K - 1) * C + c];
        for (int j = 1; j <= lim; j++) acc += x[c - j * C] * w[(K - 1 - j) * C + c];
        p[c] = acc;
        o[c] = acc * sigmoid(acc);
      }
    }
  });
}

template <typename T>
void backward_impl(const T* grad, const T* seq, const T* w, const int64_t* since, const T* pre, T* dseq, T* dw,
                   int64_t B, int64_t T_, int64_t C, int K) {
  using V = Vectorized<T>;
  const int64_t CB = 4 * V::size();  // channels per task
  const int64_t n_blocks = (C + CB - 1) / CB;
  at::parallel_for(0, n_blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> gp(CB), acc(K * CB);
    for (int64_t blk = lo; blk < hi; blk++) {
      const int64_t c0 = blk * CB, n = std::min(CB, C - c0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < T_; t++) {
          const int64_t r = b * T_ + t;
          const int64_t row = b * (T_ + K - 1) + t + K - 1;
          const int lim = taps(since, r, K);
          const T* g = grad + r * C + c0;
          const T* p = pre + r * C + c0;
          int64_t c = 0;
          for (; c + V::size() <= n; c += V::size()) {  // d pre = d out * silu'(pre), silu' = s (1 + x (1 - s))
            V x = V::loadu(p + c);
            V s = V(T(1)) / (V(T(1)) + x.neg().exp());
            (V::loadu(g + c) * s * (V(T(1)) + x * (V(T(1)) - s))).store(gp.data() + c);
          }
          for (; c < n; c++) {
            const T s = sigmoid(p[c]);
            gp[c] = g[c] * s * (T(1) + p[c] * (T(1) - s));
          }
          for (int j = 0; j <= lim; j++) {
            const T* x = seq + (row - j) * C + c0;
            T* dx = dseq + (row - j) * C + c0;
            const T* wj = w + (K - 1 - j) * C + c0;
            T* aj = acc.data() + j * CB;
            int64_t c2 = 0;
            for (; c2 + V::size() <= n; c2 += V::size()) {
              V gv = V::loadu(gp.data() + c2);
              at::vec::fmadd(gv, V::loadu(wj + c2), V::loadu(dx + c2)).store(dx + c2);
              at::vec::fmadd(gv, V::loadu(x + c2), V::loadu(aj + c2)).store(aj + c2);
            }
            for (; c2 < n; c2++) {
              dx[c2] += gp[c2] * wj[c2];
              aj[c2] += gp[c2] * x[c2];
            }
          }
        }
      }
      for (int j = 0; j < K; j++)
        for (int64_t c = 0; c < n; c++) dw[(K - 1 - j) * C + c0 + c] = acc[j * CB + c];
    }
  });
}

template <typename T>
void swiglu_forward_impl(const T* gu, T* out, int64_t R, int64_t H) {
  using V = Vectorized<T>;
  at::parallel_for(0, R, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const T* g = gu + r * 2 * H;
      const T* u = g + H;
      T* o = out + r * H;
      int64_t c = 0;
      for (; c + V::size() <= H; c += V::size()) {
        V x = V::loadu(g + c);
        (x / (V(T(1)) + x.neg().exp()) * V::loadu(u + c)).store(o + c);
      }
      for (; c < H; c++) o[c] = g[c] * sigmoid(g[c]) * u[c];
    }
  });
}

template <typename T>
void swiglu_backward_impl(const T* grad, const T* gu, T* dgu, int64_t R, int64_t H) {
  using V = Vectorized<T>;
  at::parallel_for(0, R, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const T* g = gu + r * 2 * H;
      const T* u = g + H;
      const T* d = grad + r * H;
      T* dg = dgu + r * 2 * H;
      T* du = dg + H;
      int64_t c = 0;
      for (; c + V::size() <= H; c += V::size()) {
        V x = V::loadu(g + c), s = V(T(1)) / (V(T(1)) + x.neg().exp()), dv = V::loadu(d + c);
        (dv * V::loadu(u + c) * s * (V(T(1)) + x * (V(T(1)) - s))).store(dg + c);
        (dv * x * s).store(du + c);
      }
      for (; c < H; c++) {
        const T s = sigmoid(g[c]);
        dg[c] = d[c] * u[c] * s * (T(1) + g[c] * (T(1) - s));
        du[c] = d[c] * g[c] * s;
      }
    }
  });
}

void check(const at::Tensor& seq, const at::Tensor& w, const at::Tensor& since) {
  TORCH_CHECK(seq.device().is_cpu() && w.device().is_cpu(), "causal conv CPU kernel: CPU tensors only");
  TORCH_CHECK(seq.is_contiguous() && w.is_contiguous() && since.is_contiguous(), "causal conv CPU kernel: contiguous");
  TORCH_CHECK(seq.scalar_type() == w.scalar_type(), "causal conv CPU kernel: mixed dtypes");
  TORCH_CHECK(seq.dim() == 3 && w.dim() == 2 && w.size(1) == seq.size(2) && seq.size(1) >= w.size(0) - 1,
              "causal conv CPU kernel: seq (B, T + K - 1, C), w (K, C)");
  TORCH_CHECK(since.numel() == 0 || (since.scalar_type() == at::kLong &&
                                     since.numel() == seq.size(0) * (seq.size(1) - w.size(0) + 1)),
              "causal conv CPU kernel: since (B, T) int64 or empty");
}

}  // namespace

std::vector<at::Tensor> conv_forward(at::Tensor seq, at::Tensor w, at::Tensor since) {
  check(seq, w, since);
  const int K = w.size(0);
  const int64_t B = seq.size(0), C = seq.size(2), T_ = seq.size(1) - (K - 1);
  at::Tensor pre = at::empty({B, T_, C}, seq.options()), out = at::empty({B, T_, C}, seq.options());
  const int64_t* sp = since.numel() ? since.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(seq.scalar_type(), "causal_conv_forward", [&] {
    forward_impl<scalar_t>(seq.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), sp, pre.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), B, T_, C, K);
  });
  return {out, pre};
}

std::vector<at::Tensor> conv_backward(at::Tensor grad, at::Tensor seq, at::Tensor w, at::Tensor since,
                                      at::Tensor pre) {
  check(seq, w, since);
  TORCH_CHECK(grad.is_contiguous() && pre.is_contiguous() && grad.sizes() == pre.sizes(),
              "causal conv CPU kernel: grad and pre (B, T, C), contiguous");
  const int K = w.size(0);
  const int64_t B = seq.size(0), C = seq.size(2), T_ = seq.size(1) - (K - 1);
  at::Tensor dseq = at::zeros_like(seq), dw = at::empty_like(w);
  const int64_t* sp = since.numel() ? since.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(seq.scalar_type(), "causal_conv_backward", [&] {
    backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), seq.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), sp,
                            pre.data_ptr<scalar_t>(), dseq.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), B, T_, C, K);
  });
  return {dseq, dw};
}

at::Tensor swiglu_forward(at::Tensor gu) {
  TORCH_CHECK(gu.device().is_cpu() && gu.is_contiguous() && gu.size(-1) % 2 == 0, "swiglu CPU kernel: (..., 2H)");
  const int64_t H = gu.size(-1) / 2, R = gu.numel() / (2 * H);
  auto sizes = gu.sizes().vec();
  sizes.back() = H;
  at::Tensor out = at::empty(sizes, gu.options());
  AT_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "swiglu_forward", [&] {
    swiglu_forward_impl<scalar_t>(gu.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), R, H);
  });
  return out;
}

at::Tensor swiglu_backward(at::Tensor grad, at::Tensor gu) {
  TORCH_CHECK(grad.is_contiguous() && gu.is_contiguous() && grad.numel() * 2 == gu.numel(),
              "swiglu CPU kernel: grad (..., H), gu (..., 2H)");
  const int64_t H = gu.size(-1) / 2, R = gu.numel() / (2 * H);
  at::Tensor dgu = at::empty_like(gu);
  AT_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "swiglu_backward", [&] {
    swiglu_backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(), dgu.data_ptr<scalar_t>(), R, H);
  });
  return dgu;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_forward", &conv_forward, "causal depthwise conv + SiLU, forward (CPU)");
  m.def("conv_backward", &conv_backward, "causal depthwise conv + SiLU, backward (CPU)");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up of [gate | up], forward (CPU)");
  m.def("swiglu_backward", &swiglu_backward, "silu(gate) * up of [gate | up], backward (CPU)");
}
