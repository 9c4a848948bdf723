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
//
// 3. The memory's q / k / v split into heads and normalised per head: x (B, T, P * H * D) holds P parts (q, k, v),
// each H heads of D; part p comes out as its own contiguous (B, H, T, D) tensor (the layout the memory op reads),
// y = s * x with, by the part's mode, 0: s = 1 (a copy), 1: s = 1 / max(|x|, 1e-12) (F.normalize), 2:
// s = rsqrt(mean(x^2) + 1e-6) (RMS). The backward is dx = s * (dy - c * y * <dy, y>) with c = 1 (L2; 0 where
// |x| <= 1e-12 clamps the norm), 1 / D (RMS) or 0 (copy); s and c are kept per (part, row, head).
//
// 4. The memory's read-out gate: y (B, H, T, D) per-head RMS-normalised with a scale w (H, D), heads merged and
// gated, out (B, T, H * D) = n * w * silu(g), n = y * rsqrt(mean(y^2) + 1e-6), g (B, T, H * D) the gate
// projection. Backward: dg = dout * n * w * silu'(g), dn = dout * silu(g) * w, dw = sum over rows of
// dout * silu(g) * n (per-thread partial sums), dy = r * (dn - n * <dn, n> / D).

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

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  V s0(T(0)), s1(T(0));
  int64_t i = 0;
  for (; i + 2 * V::size() <= n; i += 2 * V::size()) {
    s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
    s1 = at::vec::fmadd(V::loadu(a + i + V::size()), V::loadu(b + i + V::size()), s1);
  }
  for (; i + V::size() <= n; i += V::size()) s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
  T lanes[V::size()];
  (s0 + s1).store(lanes);
  T s = 0;
  for (int64_t l = 0; l < V::size(); l++) s += lanes[l];
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

// y = s * x (n elements); with g: y = s * (x - c * g * <x, g>) (the backward's dx from dy = x, y = g).
template <typename T>
inline void scale_into(const T* x, T s, T* y, int64_t n, const T* g = nullptr, T cg = T(0)) {
  using V = Vectorized<T>;
  int64_t i = 0;
  if (g) {
    for (; i + V::size() <= n; i += V::size())
      (V(s) * at::vec::fmadd(V(-cg), V::loadu(g + i), V::loadu(x + i))).store(y + i);
    for (; i < n; i++) y[i] = s * (x[i] - cg * g[i]);
    return;
  }
  for (; i + V::size() <= n; i += V::size()) (V(s) * V::loadu(x + i)).store(y + i);
  for (; i < n; i++) y[i] = s * x[i];
}

constexpr double kL2Eps = 1e-12, kRmsEps = 1e-6;

template <typename T>
void head_norms_forward_impl(const T* x, const std::vector<T*>& outs, T* scale, T* coef, const std::vector<int64_t>& modes,
                             int64_t B, int64_t T_, int64_t H, int64_t D) {
  const int64_t P = modes.size();
  at::parallel_for(0, B * T_, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const int64_t b = r / T_, t = r % T_;
      for (int64_t p = 0; p < P; p++)
        for (int64_t h = 0; h < H; h++) {
          const T* xi = x + (r * P + p) * H * D + h * D;
          T* yi = outs[p] + ((b * H + h) * T_ + t) * D;
          const int64_t idx = ((p * B + b) * H + h) * T_ + t;
          T s = 1, c = 0;
          if (modes[p] == 1) {
            const T n = std::sqrt(dot(xi, xi, D));
            s = n > T(kL2Eps) ? T(1) / n : T(1) / T(kL2Eps);
            c = n > T(kL2Eps) ? T(1) : T(0);
          } else if (modes[p] == 2) {
            s = T(1) / std::sqrt(dot(xi, xi, D) / T(D) + T(kRmsEps));
            c = T(1) / T(D);
          }
          scale[idx] = s;
          coef[idx] = c;
          scale_into(xi, s, yi, D);
        }
    }
  });
}

template <typename T>
void head_norms_backward_impl(const std::vector<const T*>& grads, const std::vector<const T*>& outs, const T* scale,
                              const T* coef, T* dx, int64_t P, int64_t B, int64_t T_, int64_t H, int64_t D) {
  at::parallel_for(0, B * T_, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const int64_t b = r / T_, t = r % T_;
      for (int64_t p = 0; p < P; p++)
        for (int64_t h = 0; h < H; h++) {
          T* di = dx + (r * P + p) * H * D + h * D;
          if (grads[p] == nullptr) {
            std::fill(di, di + D, T(0));
            continue;
          }
          const int64_t o = ((b * H + h) * T_ + t) * D, idx = ((p * B + b) * H + h) * T_ + t;
          const T* dy = grads[p] + o;
          const T* y = outs[p] + o;
          const T c = coef[idx];
          scale_into(dy, scale[idx], di, D, c != T(0) ? y : nullptr, c * dot(dy, y, D));
        }
    }
  });
}

template <typename T>
void gated_norm_forward_impl(const T* y, const T* w, const T* g, T* out, int64_t B, int64_t T_, int64_t H, int64_t D) {
  using V = Vectorized<T>;
  at::parallel_for(0, B * T_, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
      const int64_t b = r / T_, t = r % T_;
      for (int64_t h = 0; h < H; h++) {
        const T* yi = y + ((b * H + h) * T_ + t) * D;
        const T* wi = w + h * D;
        const T* gi = g + r * H * D + h * D;
        T* oi = out + r * H * D + h * D;
        const T rs = T(1) / std::sqrt(dot(yi, yi, D) / T(D) + T(kRmsEps));
        int64_t c = 0;
        for (; c + V::size() <= D; c += V::size()) {
          V x = V::loadu(gi + c);
          (V::loadu(yi + c) * V(rs) * V::loadu(wi + c) * (x / (V(T(1)) + x.neg().exp()))).store(oi + c);
        }
        for (; c < D; c++) oi[c] = yi[c] * rs * wi[c] * gi[c] * sigmoid(gi[c]);
      }
    }
  });
}

template <typename T>
void gated_norm_backward_impl(const T* dout, const T* y, const T* w, const T* g, T* dy, T* dw, T* dg, int64_t B,
                              int64_t T_, int64_t H, int64_t D) {
  using V = Vectorized<T>;
  const int nt = at::get_num_threads();
  std::vector<T> part((int64_t)nt * H * D, T(0));  // dw per thread
  at::parallel_for(0, B * T_, 16, [&](int64_t lo, int64_t hi) {
    T* acc = part.data() + (int64_t)at::get_thread_num() * H * D;
    std::vector<T> dn(D), n(D);
    for (int64_t r = lo; r < hi; r++) {
      const int64_t b = r / T_, t = r % T_;
      for (int64_t h = 0; h < H; h++) {
        const int64_t o = ((b * H + h) * T_ + t) * D, og = r * H * D + h * D;
        const T* yi = y + o;
        const T* wi = w + h * D;
        const T* gi = g + og;
        const T* di = dout + og;
        T* dgi = dg + og;
        T* ai = acc + h * D;
        const T rs = T(1) / std::sqrt(dot(yi, yi, D) / T(D) + T(kRmsEps));
        int64_t c = 0;
        for (; c + V::size() <= D; c += V::size()) {
          V x = V::loadu(gi + c), sg = V(T(1)) / (V(T(1)) + x.neg().exp()), d = V::loadu(di + c);
          V nv = V::loadu(yi + c) * V(rs), wv = V::loadu(wi + c), ds = d * x * sg;  // dout * silu(g)
          (d * nv * wv * sg * (V(T(1)) + x * (V(T(1)) - sg))).store(dgi + c);
          (ds * wv).store(dn.data() + c);
          nv.store(n.data() + c);
          at::vec::fmadd(ds, nv, V::loadu(ai + c)).store(ai + c);
        }
        for (; c < D; c++) {
          const T sg = sigmoid(gi[c]), nv = yi[c] * rs, ds = di[c] * gi[c] * sg;
          dgi[c] = di[c] * nv * wi[c] * sg * (T(1) + gi[c] * (T(1) - sg));
          dn[c] = ds * wi[c];
          n[c] = nv;
          ai[c] += ds * nv;
        }
        scale_into(dn.data(), rs, dy + o, D, n.data(), dot(dn.data(), n.data(), D) / T(D));
      }
    }
  });
  std::fill(dw, dw + H * D, T(0));
  for (int i = 0; i < nt; i++)
    for (int64_t c = 0; c < H * D; c++) dw[c] += part[(int64_t)i * H * D + c];
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

// x (B, T, P * H * D) -> P outputs (B, H, T, D), scale and coef (P, B, H, T).
std::vector<at::Tensor> head_norms_forward(at::Tensor x, int64_t H, std::vector<int64_t> modes) {
  const int64_t P = modes.size();
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 3 && P > 0 && x.size(2) % (P * H) == 0,
              "head norms CPU kernel: x (B, T, P * H * D), contiguous");
  for (auto m : modes) TORCH_CHECK(m >= 0 && m <= 2, "head norms CPU kernel: mode 0 (copy), 1 (L2) or 2 (RMS)");
  const int64_t B = x.size(0), T_ = x.size(1), D = x.size(2) / (P * H);
  std::vector<at::Tensor> result;
  for (int64_t p = 0; p < P; p++) result.push_back(at::empty({B, H, T_, D}, x.options()));
  at::Tensor scale = at::empty({P, B, H, T_}, x.options()), coef = at::empty({P, B, H, T_}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "head_norms_forward", [&] {
    std::vector<scalar_t*> outs;
    for (auto& o : result) outs.push_back(o.data_ptr<scalar_t>());
    head_norms_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), outs, scale.data_ptr<scalar_t>(),
                                      coef.data_ptr<scalar_t>(), modes, B, T_, H, D);
  });
  result.push_back(scale);
  result.push_back(coef);
  return result;
}

// grads: P tensors (B, H, T, D), an empty one for a part without gradient; outs: the forward's P outputs.
at::Tensor head_norms_backward(std::vector<at::Tensor> grads, std::vector<at::Tensor> outs, at::Tensor scale,
                               at::Tensor coef) {
  const int64_t P = outs.size();
  TORCH_CHECK(P > 0 && (int64_t)grads.size() == P && scale.is_contiguous() && coef.is_contiguous(),
              "head norms CPU kernel: one gradient per output");
  const int64_t B = outs[0].size(0), H = outs[0].size(1), T_ = outs[0].size(2), D = outs[0].size(3);
  for (int64_t p = 0; p < P; p++) {
    TORCH_CHECK(outs[p].is_contiguous() && outs[p].sizes() == outs[0].sizes(), "head norms CPU kernel: outputs");
    TORCH_CHECK(grads[p].numel() == 0 || (grads[p].is_contiguous() && grads[p].sizes() == outs[0].sizes() &&
                                          grads[p].scalar_type() == outs[0].scalar_type()),
                "head norms CPU kernel: gradients (B, H, T, D), contiguous");
  }
  at::Tensor dx = at::empty({B, T_, P * H * D}, outs[0].options());
  AT_DISPATCH_FLOATING_TYPES(outs[0].scalar_type(), "head_norms_backward", [&] {
    std::vector<const scalar_t*> g, o;
    for (int64_t p = 0; p < P; p++) {
      g.push_back(grads[p].numel() ? grads[p].data_ptr<scalar_t>() : nullptr);
      o.push_back(outs[p].data_ptr<scalar_t>());
    }
    head_norms_backward_impl<scalar_t>(g, o, scale.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(),
                                       dx.data_ptr<scalar_t>(), P, B, T_, H, D);
  });
  return dx;
}

void check_gated_norm(const at::Tensor& y, const at::Tensor& w, const at::Tensor& g) {
  TORCH_CHECK(y.device().is_cpu() && y.is_contiguous() && w.is_contiguous() && g.is_contiguous() && y.dim() == 4 &&
                  w.dim() == 2 && w.size(0) == y.size(1) && w.size(1) == y.size(3) && g.dim() == 3 &&
                  g.size(0) == y.size(0) && g.size(1) == y.size(2) && g.size(2) == y.size(1) * y.size(3) &&
                  w.scalar_type() == y.scalar_type() && g.scalar_type() == y.scalar_type(),
              "gated head norm CPU kernel: y (B, H, T, D), w (H, D), g (B, T, H * D), contiguous, one dtype");
}

at::Tensor gated_norm_forward(at::Tensor y, at::Tensor w, at::Tensor g) {
  check_gated_norm(y, w, g);
  const int64_t B = y.size(0), H = y.size(1), T_ = y.size(2), D = y.size(3);
  at::Tensor out = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gated_norm_forward", [&] {
    gated_norm_forward_impl<scalar_t>(y.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(), B, T_, H, D);
  });
  return out;
}

std::vector<at::Tensor> gated_norm_backward(at::Tensor dout, at::Tensor y, at::Tensor w, at::Tensor g) {
  check_gated_norm(y, w, g);
  TORCH_CHECK(dout.is_contiguous() && dout.sizes() == g.sizes(), "gated head norm CPU kernel: dout like g");
  const int64_t B = y.size(0), H = y.size(1), T_ = y.size(2), D = y.size(3);
  at::Tensor dy = at::empty_like(y), dw = at::empty_like(w), dg = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gated_norm_backward", [&] {
    gated_norm_backward_impl<scalar_t>(dout.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                       g.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                                       dg.data_ptr<scalar_t>(), B, T_, H, D);
  });
  return {dy, dw, dg};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_forward", &conv_forward, "causal depthwise conv + SiLU, forward (CPU)");
  m.def("conv_backward", &conv_backward, "causal depthwise conv + SiLU, backward (CPU)");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up of [gate | up], forward (CPU)");
  m.def("swiglu_backward", &swiglu_backward, "silu(gate) * up of [gate | up], backward (CPU)");
  m.def("head_norms_forward", &head_norms_forward, "q / k / v split into heads and normalised, forward (CPU)");
  m.def("head_norms_backward", &head_norms_backward, "q / k / v split into heads and normalised, backward (CPU)");
  m.def("gated_norm_forward", &gated_norm_forward, "per-head RMS norm, heads merged, SiLU gate, forward (CPU)");
  m.def("gated_norm_backward", &gated_norm_backward, "per-head RMS norm, heads merged, SiLU gate, backward (CPU)");
}
