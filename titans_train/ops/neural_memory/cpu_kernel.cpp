// CPU kernel of the chunked dual form (TITANS.md section 2): forward and hand-written backward.
//
// The backward is the adjoint of each forward step in reverse, derived by hand in the comments of backward_impl
// (query side, state update, the delta chain's second-order terms, the LayerNorm backward's own derivative, the
// key-side chain); triton_kernel.py follows the same steps on GPUs. Every (batch, head) item runs its whole sequence
// of memory chunks on one thread (at::parallel_for over batch * heads), with its fast-weight state (a few hundred KB) staying in that
// core's cache, and every matmul is one direct BLAS call on row-major blocks (no dispatcher, no autograd graph, no
// per-chunk Python). The backward recomputes each segment of K chunks from a per-segment state checkpoint.
//
// Layouts (row-major, contiguous, BH = batch * heads, N chunks of b tokens):
//   q, k, v: (BH, N, b, D); BF: (BH, N, 2, b) rows [Bc_i; F_i]; G: (BH, N, L, b, b);
//   E3: (BH, N, 3) chunk-end [Bc_e, P_e, F_e]; GS: (BH, N, L, 2, b) chunk-end rows [G[b-1, j]; Deta[b-1, j] theta_j];
//   state: (BH, sum_l 2 * in_l * out_l), per layer [W_l; S_l];
//   target: (R, sum_l in_l * out_l), per layer the weights the gate decays towards (forget_to), item bh reading row
//   bh % R (R = BH, or R = heads for one target shared by the batch rows), or empty for zero:
//   then W_i = Bc_i W + (1 - Bc_i) target + ... inside a chunk and W' = Bc_e W + (1 - Bc_e) target + ... at its end.
// Output: the queries' last-layer pre-norm outputs (BH, N, b, D) and the final state.

#include "../cpu_capability.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <new>
#include <cmath>
#include <cstring>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

using at::vec::Vectorized;

// 64-byte aligned workspace: every block starts on a cache line (and a full AVX-512 vector), in every process alike.
template <typename T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <typename U>
  Aligned(const Aligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned<U>&) const { return false; }
};
template <typename T>
using Buf = std::vector<T, Aligned<T>>;

template <typename T>
void blas(char ta, char tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
          int ldc);
template <>
void blas<float>(char ta, char tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc);
}
template <>
void blas<double>(char ta, char tb, int m, int n, int k, double alpha, const double* A, int lda, const double* B,
                  int ldb, double beta, double* C, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, A, &lda, B, &ldb, &beta, C, &ldc);
}

// Row-major C (m x n) = alpha * op(A) @ op(B) + beta * C. A is stored (m x k), or (k x m) when ta;
// B is stored (k x n), or (n x k) when tb. BLAS is column-major, so this computes C^T = op(B)^T op(A)^T.
template <typename T>
inline void mm(bool ta, bool tb, int m, int n, int k, T alpha, const T* A, const T* B, T beta, T* C) {
  blas<T>(tb ? 'T' : 'N', ta ? 'T' : 'N', n, m, k, alpha, B, tb ? k : n, A, ta ? m : k, beta, C, n);
}

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// Exact (erf) GELU and its first two derivatives, vectorised with ATen's SLEEF-backed Vectorized.
template <typename T>
void gelu(const T* z, T* out, int n) {
  using V = Vectorized<T>;
  int i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V x = V::loadu(z + i);
    (x * V(T(0.5)) * (V(T(1)) + (x * V(T(kInvSqrt2))).erf())).store(out + i);
  }
  for (; i < n; i++) out[i] = T(0.5) * z[i] * (T(1) + std::erf(z[i] * T(kInvSqrt2)));
}

// out = scale * GELU'(z) (+ add when add != nullptr), GELU'(z) = Phi(z) + z phi(z).
template <typename T>
void gelu_grad(const T* z, const T* scale, T* out, int n) {
  using V = Vectorized<T>;
  int i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V x = V::loadu(z + i);
    V cdf = V(T(0.5)) * (V(T(1)) + (x * V(T(kInvSqrt2))).erf());
    V pdf = (x * x * V(T(-0.5))).exp() * V(T(kInvSqrt2Pi));
    V g = cdf + x * pdf;
    if (scale) g = g * V::loadu(scale + i);
    g.store(out + i);
  }
  for (; i < n; i++) {
    T x = z[i];
    T g = T(0.5) * (T(1) + std::erf(x * T(kInvSqrt2))) + x * std::exp(T(-0.5) * x * x) * T(kInvSqrt2Pi);
    out[i] = scale ? g * scale[i] : g;
  }
}

// out = a * b * GELU''(z), GELU''(z) = phi(z) (2 - z^2).
template <typename T>
void gelu_grad2_mul(const T* z, const T* a, const T* b, T* out, int n) {
  using V = Vectorized<T>;
  int i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V x = V::loadu(z + i);
    V x2 = x * x;
    V g = (x2 * V(T(-0.5))).exp() * V(T(kInvSqrt2Pi)) * (V(T(2)) - x2);
    (g * V::loadu(a + i) * V::loadu(b + i)).store(out + i);
  }
  for (; i < n; i++) {
    T x = z[i];
    out[i] = std::exp(T(-0.5) * x * x) * T(kInvSqrt2Pi) * (T(2) - x * x) * a[i] * b[i];
  }
}

// Reductions with several vector accumulators: a plain `s += a[i] * b[i]` loop is one serial dependency chain
// (the compiler may not reorder float adds), which made the state dot products the backward's largest cost.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
    s1 = at::vec::fmadd(V::loadu(a + i + W), V::loadu(b + i + W), s1);
    s2 = at::vec::fmadd(V::loadu(a + i + 2 * W), V::loadu(b + i + 2 * W), s2);
    s3 = at::vec::fmadd(V::loadu(a + i + 3 * W), V::loadu(b + i + 3 * W), s3);
  }
  for (; i + W <= n; i += W) s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
  T lanes[W];
  ((s0 + s1) + (s2 + s3)).store(lanes);
  T s = 0;
  for (int64_t l = 0; l < W; l++) s += lanes[l];
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

template <typename T>
inline T mean(const T* a, int n) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  V s0(T(0));
  int i = 0;
  for (; i + W <= n; i += W) s0 = s0 + V::loadu(a + i);
  T lanes[W];
  s0.store(lanes);
  T s = 0;
  for (int l = 0; l < W; l++) s += lanes[l];
  for (; i < n; i++) s += a[i];
  return s / T(n);
}

// NW = Bce CW, NS = Pe CS + Fe CW, and eWW += <W, CW>, eSS += <S, CS>, eSW += <S, CW>, in one pass. With a decay
// target tg (W' = Bce W + ... + (1 - Bce) tg): also eWW -= <tg, CW> and dT += (1 - Bce) CW, in the same pass.
template <typename T>
void carry_pass(const T* W, const T* S, const T* CW, const T* CS, T* NW, T* NS, int64_t n, T Bce, T Pe, T Fe, T& eWW,
                T& eSS, T& eSW, const T* tg = nullptr, T* dT = nullptr) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V a(T(0)), b(T(0)), c(T(0)), vB(Bce), vP(Pe), vF(Fe), vK(T(1) - Bce);
  int64_t i = 0;
  if (tg) {
    for (; i + L <= n; i += L) {
      V cw = V::loadu(CW + i), cs = V::loadu(CS + i), w = V::loadu(W + i) - V::loadu(tg + i), s = V::loadu(S + i);
      (vB * cw).store(NW + i);
      at::vec::fmadd(vP, cs, vF * cw).store(NS + i);
      at::vec::fmadd(vK, cw, V::loadu(dT + i)).store(dT + i);
      a = at::vec::fmadd(w, cw, a);  // <W - tg, CW>
      b = at::vec::fmadd(s, cs, b);
      c = at::vec::fmadd(s, cw, c);
    }
  }
  for (; tg == nullptr && i + L <= n; i += L) {
    V cw = V::loadu(CW + i), cs = V::loadu(CS + i), w = V::loadu(W + i), s = V::loadu(S + i);
    (vB * cw).store(NW + i);
    at::vec::fmadd(vP, cs, vF * cw).store(NS + i);
    a = at::vec::fmadd(w, cw, a);
    b = at::vec::fmadd(s, cs, b);
    c = at::vec::fmadd(s, cw, c);
  }
  T la[L], lb[L], lc[L];
  a.store(la);
  b.store(lb);
  c.store(lc);
  for (int64_t l = 0; l < L; l++) {
    eWW += la[l];
    eSS += lb[l];
    eSW += lc[l];
  }
  for (; i < n; i++) {
    NW[i] = Bce * CW[i];
    NS[i] = Pe * CS[i] + Fe * CW[i];
    if (tg) {
      eWW -= tg[i] * CW[i];
      dT[i] += (T(1) - Bce) * CW[i];
    }
    eWW += W[i] * CW[i];
    eSS += S[i] * CS[i];
    eSW += S[i] * CW[i];
  }
}

// Problem dimensions and per-item input pointers.
template <typename T>
struct Problem {
  int N, b, D, L;
  bool residual, layer_norm;
  double ln_eps;  // the LayerNorm's epsilon
  std::vector<int> din, dout;
  std::vector<int64_t> off;  // offset of layer l's [W; S] inside a state
  std::vector<int64_t> toff;  // offset of layer l inside a target
  int64_t state_size, target_size, target_rows;
  bool has_target;
  // per-item pointers (set by item()); tgt is nullptr without a target
  const T *q, *k, *v, *BF, *G, *E3, *GS, *tgt;
};

// Scratch of one segment of K chunks: anchors and every intermediate the backward needs.
template <typename T>
struct Segment {
  int K, b;
  Buf<T> st;  // (K + 1) states
  std::vector<Buf<T>> acts, zs, es, deltas, hs, zq, hA;  // [l] -> K blocks
  Buf<T> ys, g0s, rstds;
  std::vector<int64_t> sz_in, sz_out;
  int64_t state_size;

  Segment(const Problem<T>& p, int K_) : K(K_), b(p.b), state_size(p.state_size) {
    st.resize((K + 1) * p.state_size);
    int L = p.L;
    for (auto* v : {&acts, &zs, &es, &deltas, &hs, &zq, &hA}) v->resize(L);
    for (int l = 0; l < L; l++) {
      sz_in.push_back((int64_t)b * p.din[l]);
      sz_out.push_back((int64_t)b * p.dout[l]);
      acts[l].resize(K * sz_in[l]);
      hs[l].resize(K * sz_in[l]);
      zs[l].resize(K * sz_out[l]);
      es[l].resize(K * sz_out[l]);
      deltas[l].resize(K * sz_out[l]);
      zq[l].resize(K * sz_out[l]);
      hA[l].resize(K * b * b);
    }
    ys.resize(K * b * p.D);
    g0s.resize(K * b * p.D);
    rstds.resize(K * b);
  }
  T* state(int j) { return st.data() + j * state_size; }
  T* act(int j, int l) { return acts[l].data() + j * sz_in[l]; }
  T* h(int j, int l) { return hs[l].data() + j * sz_in[l]; }
  T* z(int j, int l) { return zs[l].data() + j * sz_out[l]; }
  T* e(int j, int l) { return es[l].data() + j * sz_out[l]; }
  T* delta(int j, int l) { return deltas[l].data() + j * sz_out[l]; }
  T* zqs(int j, int l) { return zq[l].data() + j * sz_out[l]; }
  T* ha(int j, int l) { return hA[l].data() + j * b * b; }
};

// One memory chunk n (intermediates in segment slot j): key side, query side (written to out when given), and the
// state advance from anchor st to nxt.
template <typename T>
void chunk_forward(const Problem<T>& p, Segment<T>& s, int n, int j, const T* st, T* nxt, T* out,
                   Buf<T>& tmp) {
  const int b = p.b, D = p.D, L = p.L;
  const T* k = p.k + (int64_t)n * b * D;
  const T* v = p.v + (int64_t)n * b * D;
  const T* q = p.q + (int64_t)n * b * D;
  std::memcpy(s.act(j, 0), k, sizeof(T) * b * D);
  std::memcpy(s.h(j, 0), q, sizeof(T) * b * D);

  // Keys at the anchor weights: z_l = a_l W_l, a_{l+1} = gelu(z_l).
  for (int l = 0; l < L; l++) {
    const T* W = st + p.off[l];
    mm<T>(false, false, b, p.dout[l], p.din[l], T(1), s.act(j, l), W, T(0), s.z(j, l));
    if (l < L - 1) gelu<T>(s.z(j, l), s.act(j, l + 1), b * p.dout[l]);
  }
  // Inner-loss error at the output, through the LayerNorm (no affine) when present.
  const T* f = s.z(j, L - 1);
  T* g = s.delta(j, L - 1);
  for (int i = 0; i < b; i++) {
    const T* fi = f + i * D;
    T* gi = g + i * D;
    const T* ki = k + i * D;
    const T* vi = v + i * D;
    if (p.layer_norm) {
      T mu = mean(fi, D), var = 0;
      for (int c = 0; c < D; c++) var += (fi[c] - mu) * (fi[c] - mu);
      T rstd = T(1) / std::sqrt(var / T(D) + T(p.ln_eps));
      T* y = s.ys.data() + ((int64_t)j * b + i) * D;
      T* g0 = s.g0s.data() + ((int64_t)j * b + i) * D;
      s.rstds[j * b + i] = rstd;
      for (int c = 0; c < D; c++) {
        y[c] = (fi[c] - mu) * rstd;
        g0[c] = T(2) * ((p.residual ? y[c] + ki[c] : y[c]) - vi[c]);
      }
      T m1 = mean(g0, D), m2 = dot(g0, y, D) / T(D);
      for (int c = 0; c < D; c++) gi[c] = rstd * (g0[c] - m1 - y[c] * m2);
    } else {
      for (int c = 0; c < D; c++) gi[c] = T(2) * ((p.residual ? fi[c] + ki[c] : fi[c]) - vi[c]);
    }
  }
  // delta_l = (delta_{l+1} W_{l+1}^T) * GELU'(z_l)
  for (int l = L - 2; l >= 0; l--) {
    mm<T>(false, true, b, p.dout[l], p.dout[l + 1], T(1), s.delta(j, l + 1), st + p.off[l + 1], T(0), s.e(j, l));
    gelu_grad<T>(s.z(j, l), s.e(j, l), s.delta(j, l), b * p.dout[l]);
  }

  // Queries, each with its own weights: Z = Bc * (X W) + F * (X S) - (G * X A^T) Delta.
  const T* Bc = p.BF + (int64_t)n * 2 * b;
  const T* Fr = Bc + b;
  for (int l = 0; l < L; l++) {
    const int di = p.din[l], dl = p.dout[l];
    const T* WS = st + p.off[l];  // [W; S] (2 in x out)
    const T* Gl = p.G + (((int64_t)n * L + l) * b) * b;
    T *h = s.h(j, l), *hA = s.ha(j, l), *z = s.zqs(j, l);
    // [Bc * X | F * X] (b x 2 in) @ [W; S] (2 in x out): both read-outs in one matmul (the state stacks W over S)
    T* hh = tmp.data() + b * b;
    for (int i = 0; i < b; i++)
      for (int c = 0; c < di; c++) {
        hh[i * 2 * di + c] = Bc[i] * h[i * di + c];
        hh[i * 2 * di + di + c] = Fr[i] * h[i * di + c];
      }
    mm<T>(false, false, b, dl, 2 * di, T(1), hh, WS, T(0), z);
    if (p.tgt) {  // + ((1 - Bc) * X) target
      for (int i = 0; i < b; i++)
        for (int c = 0; c < di; c++) hh[i * di + c] = (T(1) - Bc[i]) * h[i * di + c];
      mm<T>(false, false, b, dl, di, T(1), hh, p.tgt + p.toff[l], T(1), z);
    }
    mm<T>(false, true, b, b, di, T(1), h, s.act(j, l), T(0), hA);
    T* sc = tmp.data();
    for (int t = 0; t < b * b; t++) sc[t] = hA[t] * Gl[t];
    mm<T>(false, false, b, dl, b, T(-1), sc, s.delta(j, l), T(1), z);
    if (l < L - 1)
      gelu<T>(z, s.h(j, l + 1), b * dl);
    else if (out)
      std::memcpy(out + (int64_t)n * b * D, z, sizeof(T) * b * D);
  }

  // Chunk-end state: W' = Bc_e W + F_e S - A^T (G_end * Delta), S' = P_e S - A^T (S_end * Delta).
  const T Bce = p.E3[n * 3], Pe = p.E3[n * 3 + 1], Fe = p.E3[n * 3 + 2];
  for (int l = 0; l < L; l++) {
    const int di = p.din[l], dl = p.dout[l];
    const int64_t io = (int64_t)di * dl;
    const T* W = st + p.off[l];
    const T* S = W + io;
    T* Wn = nxt + p.off[l];
    T* Sn = Wn + io;
    if (p.tgt) {
      const T* tg = p.tgt + p.toff[l];
      for (int64_t t = 0; t < io; t++) {
        Wn[t] = Bce * W[t] + Fe * S[t] + (T(1) - Bce) * tg[t];
        Sn[t] = Pe * S[t];
      }
    } else {
      for (int64_t t = 0; t < io; t++) {
        Wn[t] = Bce * W[t] + Fe * S[t];
        Sn[t] = Pe * S[t];
      }
    }
    const T* GSl = p.GS + (((int64_t)n * L + l) * 2) * b;
    const T* dlt = s.delta(j, l);
    T* M = tmp.data();
    for (int i = 0; i < b; i++)
      for (int c = 0; c < dl; c++) M[i * dl + c] = GSl[i] * dlt[i * dl + c];
    mm<T>(true, false, di, dl, b, T(-1), s.act(j, l), M, T(1), Wn);
    for (int i = 0; i < b; i++)
      for (int c = 0; c < dl; c++) M[i * dl + c] = GSl[b + i] * dlt[i * dl + c];
    mm<T>(true, false, di, dl, b, T(-1), s.act(j, l), M, T(1), Sn);
  }
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const std::vector<int64_t>& dims, bool residual, bool layer_norm,
                        double ln_eps) {
  Problem<T> p;
  p.N = q.size(1);
  p.b = q.size(2);
  p.D = q.size(3);
  p.L = dims.size() - 1;
  p.residual = residual;
  p.layer_norm = layer_norm;
  p.ln_eps = ln_eps;
  int64_t o = 0, to = 0;
  for (int l = 0; l < p.L; l++) {
    p.din.push_back(dims[l]);
    p.dout.push_back(dims[l + 1]);
    p.off.push_back(o);
    p.toff.push_back(to);
    o += 2 * dims[l] * dims[l + 1];
    to += dims[l] * dims[l + 1];
  }
  p.state_size = o;
  p.target_size = to;
  p.has_target = false;
  p.target_rows = 1;
  p.tgt = nullptr;
  return p;
}

template <typename T>
void set_item(Problem<T>& p, int64_t bh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& BF, const at::Tensor& G, const at::Tensor& E3, const at::Tensor& GS) {
  const int64_t tok = (int64_t)p.N * p.b * p.D;
  p.q = q.data_ptr<T>() + bh * tok;
  p.k = k.data_ptr<T>() + bh * tok;
  p.v = v.data_ptr<T>() + bh * tok;
  p.BF = BF.data_ptr<T>() + bh * p.N * 2 * p.b;
  p.G = G.data_ptr<T>() + bh * p.N * p.L * p.b * p.b;
  p.E3 = E3.data_ptr<T>() + bh * p.N * 3;
  p.GS = GS.data_ptr<T>() + bh * p.N * p.L * 2 * p.b;
}

// The item's decay target (nullptr when the problem has none).
template <typename T>
void set_target(Problem<T>& p, int64_t bh, const at::Tensor& target) {
  p.tgt = p.has_target ? target.data_ptr<T>() + (bh % p.target_rows) * p.target_size : nullptr;
}

int64_t max_dim(const std::vector<int64_t>& dims) { return *std::max_element(dims.begin(), dims.end()); }

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& BF, const at::Tensor& G, const at::Tensor& E3,
                                     const at::Tensor& GS, const at::Tensor& state, const at::Tensor& target,
                                     const std::vector<int64_t>& dims, int64_t K, bool residual, bool layer_norm,
                                     double ln_eps, bool save) {
  const int64_t BH = q.size(0);
  Problem<T> proto = make_problem<T>(q, dims, residual, layer_norm, ln_eps);
  proto.has_target = target.numel() > 0;
  proto.target_rows = proto.has_target ? target.size(0) : 1;
  TORCH_CHECK(!proto.has_target || (target.dim() == 2 && target.size(1) == proto.target_size &&
                                    BH % proto.target_rows == 0),
              "titans memory CPU kernel: target must be (R, sum_l in_l * out_l) with R dividing BH");
  const int N = proto.N;
  K = std::min<int64_t>(K, N);
  const int64_t n_seg = (N + K - 1) / K;
  at::Tensor out = at::empty_like(q);
  at::Tensor final_state = at::empty_like(state);
  // One state per segment of K chunks for the backward to recompute from (none when no backward will run:
  // at a million tokens they would be gigabytes).
  at::Tensor ckpt = at::empty({save ? BH : 0, n_seg, proto.state_size}, state.options());
  const int64_t tmp_size = (int64_t)proto.b * (proto.b + 2 * std::max<int64_t>(max_dim(dims), proto.b));
  at::parallel_for(0, BH, 1, [&](int64_t lo, int64_t hi) {
    Problem<T> p = proto;
    Segment<T> s(p, 1);  // the forward keeps nothing per chunk: ping-pong between its two states
    Buf<T> tmp(tmp_size);
    for (int64_t bh = lo; bh < hi; bh++) {
      set_item(p, bh, q, k, v, BF, G, E3, GS);
      set_target(p, bh, target);
      T *cur = s.state(0), *nxt = s.state(1);
      std::memcpy(cur, state.data_ptr<T>() + bh * p.state_size, sizeof(T) * p.state_size);
      T* ck = save ? ckpt.data_ptr<T>() + bh * n_seg * p.state_size : nullptr;
      T* o = out.data_ptr<T>() + bh * (int64_t)N * p.b * p.D;
      for (int n = 0; n < N; n++) {
        if (save && n % K == 0) std::memcpy(ck + (n / K) * p.state_size, cur, sizeof(T) * p.state_size);
        chunk_forward<T>(p, s, n, 0, cur, nxt, o, tmp);
        std::swap(cur, nxt);
      }
      std::memcpy(final_state.data_ptr<T>() + bh * p.state_size, cur, sizeof(T) * p.state_size);
    }
  });
  return {out, final_state, ckpt};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& BF, const at::Tensor& G, const at::Tensor& E3,
                                      const at::Tensor& GS, const at::Tensor& target, const at::Tensor& ckpt,
                                      const at::Tensor& dout, const at::Tensor& dfinal,
                                      const std::vector<int64_t>& dims, int64_t K, bool residual, bool layer_norm,
                                      double ln_eps) {
  const int64_t BH = q.size(0);
  Problem<T> proto = make_problem<T>(q, dims, residual, layer_norm, ln_eps);
  proto.has_target = target.numel() > 0;
  proto.target_rows = proto.has_target ? target.size(0) : 1;
  const int N = proto.N, b = proto.b, D = proto.D, L = proto.L;
  K = std::min<int64_t>(K, N);
  const int64_t n_seg = (N + K - 1) / K;
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dBF = at::empty_like(BF), dG = at::empty_like(G), dGS = at::empty_like(GS);
  at::Tensor dE3 = at::empty_like(E3);
  at::Tensor dstate = at::empty_like(dfinal);
  // per item, summed over its chunks (the caller sums the items that share a target row)
  at::Tensor dtarget = proto.has_target ? at::zeros({BH, proto.target_size}, q.options()) : at::zeros_like(target);
  const int64_t md = std::max<int64_t>(max_dim(dims), b);
  at::parallel_for(0, BH, 1, [&](int64_t lo, int64_t hi) {
    Problem<T> p = proto;
    Segment<T> s(p, K);
    Buf<T> tmp(b * (b + 2 * md)), carry(p.state_size), spare(p.state_size);
    Buf<T> dz(b * md), dh(b * md), dsc(b * b), scG(b * b), RW(2 * b * md), M(b * md);
    std::vector<Buf<T>> X0(L), X1(L), ddq(L), daq(L), dd(L), da(L), de(L), dzx(L);
    for (int l = 0; l < L; l++) {
      for (auto* x : {&X0[l], &X1[l], &ddq[l], &dd[l], &de[l], &dzx[l]}) x->resize(b * p.dout[l]);
      for (auto* x : {&daq[l], &da[l]}) x->resize(b * p.din[l]);
    }
    Buf<T> dzl(b * md), dzl2(b * md), LH(3 * b * md), RH(3 * b * md), UU(2 * b * md);
    for (int64_t bh = lo; bh < hi; bh++) {
      set_item(p, bh, q, k, v, BF, G, E3, GS);
      set_target(p, bh, target);
      T* dT = p.tgt ? dtarget.data_ptr<T>() + bh * p.target_size : nullptr;
      const T* ck = ckpt.data_ptr<T>() + bh * n_seg * p.state_size;
      const T* dO = dout.data_ptr<T>() + bh * (int64_t)N * b * D;
      T* dQ = dq.data_ptr<T>() + bh * (int64_t)N * b * D;
      T* dK = dk.data_ptr<T>() + bh * (int64_t)N * b * D;
      T* dV = dv.data_ptr<T>() + bh * (int64_t)N * b * D;
      T* dBFp = dBF.data_ptr<T>() + bh * N * 2 * b;
      T* dGp = dG.data_ptr<T>() + bh * N * L * b * b;
      T* dGSp = dGS.data_ptr<T>() + bh * N * L * 2 * b;
      T* dE3p = dE3.data_ptr<T>() + bh * N * 3;
      std::memcpy(carry.data(), dfinal.data_ptr<T>() + bh * p.state_size, sizeof(T) * p.state_size);

      for (int64_t sg = n_seg - 1; sg >= 0; sg--) {
        const int n0 = sg * K, n1 = std::min<int>(N, n0 + K);
        std::memcpy(s.state(0), ck + sg * p.state_size, sizeof(T) * p.state_size);
        for (int j = 0; j < n1 - n0; j++) chunk_forward<T>(p, s, n0 + j, j, s.state(j), s.state(j + 1), nullptr, tmp);

        for (int j = n1 - n0 - 1; j >= 0; j--) {
          const int n = n0 + j;
          const T* st = s.state(j);
          const T* Bc = p.BF + (int64_t)n * 2 * b;
          const T* Fr = Bc + b;
          T* dBFn = dBFp + (int64_t)n * 2 * b;
          std::fill(dBFn, dBFn + 2 * b, T(0));

          // ---- query side backward ---------------------------------------------------------------------------
          std::memcpy(dz.data(), dO + (int64_t)n * b * D, sizeof(T) * b * D);
          for (int l = L - 1; l >= 0; l--) {
            const int di = p.din[l], dl = p.dout[l];
            const T* WS = st + p.off[l];  // [W; S] (2 in x out)
            const T* Gl = p.G + (((int64_t)n * L + l) * b) * b;
            const T *hA = s.ha(j, l), *dlt = s.delta(j, l), *h = s.h(j, l);
            for (int i = 0; i < b; i++)
              for (int c = 0; c < dl; c++) {
                X0[l][i * dl + c] = Bc[i] * dz[i * dl + c];
                X1[l][i * dl + c] = Fr[i] * dz[i * dl + c];
              }
            // U = dz [W; S]^T = [dz W^T | dz S^T] (b x 2 in): dh = Bc U_W + F U_S, dBc_i = h_i . U_W_i, dF_i = h_i . U_S_i
            T* U = UU.data();
            mm<T>(false, true, b, 2 * di, dl, T(1), dz.data(), WS, T(0), U);
            for (int i = 0; i < b; i++) {
              const T* uw = U + i * 2 * di;
              const T* us = uw + di;
              dBFn[i] += dot(h + i * di, uw, di);
              dBFn[b + i] += dot(h + i * di, us, di);
              for (int c = 0; c < di; c++) dh[i * di + c] = Bc[i] * uw[c] + Fr[i] * us[c];
            }
            if (p.tgt) {  // z += ((1 - Bc) * h) target: U_T = dz target^T (b x in)
              const T* tg = p.tgt + p.toff[l];
              T* UT = M.data();
              mm<T>(false, true, b, di, dl, T(1), dz.data(), tg, T(0), UT);
              for (int i = 0; i < b; i++) {
                dBFn[i] -= dot(h + i * di, UT + i * di, di);
                for (int c = 0; c < di; c++) dh[i * di + c] += (T(1) - Bc[i]) * UT[i * di + c];
              }
              T* hc = UT;  // dtarget += ((1 - Bc) * h)^T dz
              for (int i = 0; i < b; i++)
                for (int c = 0; c < di; c++) hc[i * di + c] = (T(1) - Bc[i]) * h[i * di + c];
              mm<T>(true, false, di, dl, b, T(1), hc, dz.data(), T(1), dT + p.toff[l]);
            }
            mm<T>(false, true, b, b, dl, T(-1), dz.data(), dlt, T(0), dsc.data());
            for (int t = 0; t < b * b; t++) scG[t] = hA[t] * Gl[t];
            mm<T>(true, false, b, dl, b, T(-1), scG.data(), dz.data(), T(0), ddq[l].data());
            T* dGn = dGp + (((int64_t)n * L + l) * b) * b;
            for (int t = 0; t < b * b; t++) {
              dGn[t] = dsc[t] * hA[t];
              dsc[t] *= Gl[t];
            }
            mm<T>(false, false, b, di, b, T(1), dsc.data(), s.act(j, l), T(1), dh.data());
            mm<T>(true, false, b, di, b, T(1), dsc.data(), s.h(j, l), T(0), daq[l].data());
            if (l > 0)
              gelu_grad<T>(s.zqs(j, l - 1), dh.data(), dz.data(), b * di);
            else
              std::memcpy(dQ + (int64_t)n * b * D, dh.data(), sizeof(T) * b * D);
          }

          // ---- state update backward (carry = d[W'; S'] of the chunk-end state) --------------------------------
          const T Bce = p.E3[n * 3], Pe = p.E3[n * 3 + 1], Fe = p.E3[n * 3 + 2];
          T eWW = 0, eSS = 0, eSW = 0;
          for (int l = 0; l < L; l++) {
            const int di = p.din[l], dl = p.dout[l];
            const T* C = carry.data() + p.off[l];  // [dW'; dS'] (2 in x out)
            const T* a = s.act(j, l);
            const T* dlt = s.delta(j, l);
            const T* GSl = p.GS + (((int64_t)n * L + l) * 2) * b;
            T* dGSl = dGSp + (((int64_t)n * L + l) * 2) * b;
            // ddelta = ddelta_q - G_end a dW' - S_end a dS' = ddelta_q - [G_end * a | S_end * a] [dW'; dS']
            T* aa = UU.data();
            for (int i = 0; i < b; i++)
              for (int c = 0; c < di; c++) {
                aa[i * 2 * di + c] = GSl[i] * a[i * di + c];
                aa[i * 2 * di + di + c] = GSl[b + i] * a[i * di + c];
              }
            std::memcpy(dd[l].data(), ddq[l].data(), sizeof(T) * b * dl);
            mm<T>(false, false, b, dl, 2 * di, T(-1), aa, C, T(1), dd[l].data());
            // P = delta [dW'; dS']^T (b x 2 in): da = da_q - G_end P_W - S_end P_S, dG_end_j = -a_j . P_W_j, ...
            T* P = RW.data();
            mm<T>(false, true, b, 2 * di, dl, T(1), dlt, C, T(0), P);
            for (int i = 0; i < b; i++) {
              const T* pw = P + i * 2 * di;
              const T* ps = pw + di;
              dGSl[i] = -dot(a + i * di, pw, di);
              dGSl[b + i] = -dot(a + i * di, ps, di);
              for (int c = 0; c < di; c++) da[l][i * di + c] = daq[l][i * di + c] - GSl[i] * pw[c] - GSl[b + i] * ps[c];
            }
          }

          // ---- key side: the delta chain backward (delta_l = (delta_{l+1} W_{l+1}^T) * GELU'(z_l)) -------------
          for (int l = 0; l < L - 1; l++) {
            const int sz = b * p.dout[l];
            gelu_grad<T>(s.z(j, l), dd[l].data(), de[l].data(), sz);
            gelu_grad2_mul<T>(s.z(j, l), dd[l].data(), s.e(j, l), dzx[l].data(), sz);
            mm<T>(false, false, b, p.dout[l + 1], p.dout[l], T(1), de[l].data(), st + p.off[l + 1], T(1),
                  dd[l + 1].data());
          }
          // through the inner loss and the LayerNorm backward: d(loss)/d f and d/d (residual k, v)
          T* df = dzl.data();
          for (int i = 0; i < b; i++) {
            const T* dg = dd[L - 1].data() + i * D;
            T* dfi = df + i * D;
            T* dVi = dV + ((int64_t)n * b + i) * D;
            T* dres = tmp.data() + i * D;
            if (p.layer_norm) {
              const T* y = s.ys.data() + ((int64_t)j * b + i) * D;
              const T* g0 = s.g0s.data() + ((int64_t)j * b + i) * D;
              const T* gg = s.delta(j, L - 1) + i * D;
              const T rstd = s.rstds[j * b + i];
              const T m1 = mean(dg, D), m2 = dot(dg, y, D) / T(D);
              const T c = dot(g0, y, D) / T(D), m6 = dot(dg, gg, D) / T(D);
              T* dg0 = M.data();
              T* dy = RW.data();
              for (int t = 0; t < D; t++) dg0[t] = rstd * (dg[t] - m1 - y[t] * m2);
              for (int t = 0; t < D; t++) dy[t] = T(2) * dg0[t] - rstd * (c * dg[t] + m2 * g0[t]);
              const T m4 = mean(dy, D), m5 = dot(dy, y, D) / T(D);
              for (int t = 0; t < D; t++) {
                dfi[t] = rstd * ((dy[t] - m4 - y[t] * m5) - m6 * y[t]);
                dres[t] = T(2) * dg0[t];
              }
            } else {
              for (int t = 0; t < D; t++) dfi[t] = dres[t] = T(2) * dg[t];
            }
            for (int t = 0; t < D; t++) dVi[t] = -dres[t];
          }
          // forward chain backward (z_l = a_l W_l, a_{l+1} = gelu(z_l)) and the next carry
          T* cur = dzl.data();
          T* other = dzl2.data();
          for (int l = L - 1; l >= 0; l--) {
            const int di = p.din[l], dl = p.dout[l];
            const int64_t io = (int64_t)di * dl;
            const T* W = st + p.off[l];
            const T* CW = carry.data() + p.off[l];
            const T* CS = CW + io;
            T* NW = spare.data() + p.off[l];
            T* NS = NW + io;
            // one pass over the state: the carry's decay and the coefficients' gradients <W, dW'>, <S, dS'>, <S, dW'>
            // W' += (1 - Bc_e) target: dBc_e -= <target, dW'>, dtarget += (1 - Bc_e) dW' (in the same pass)
            carry_pass<T>(W, W + io, CW, CS, NW, NS, io, Bce, Pe, Fe, eWW, eSS, eSW,
                          p.tgt ? p.tgt + p.toff[l] : nullptr, p.tgt ? dT + p.toff[l] : nullptr);
            // the rank-b terms of dW stacked along k: one gemm [a; h; de]^T [dz; X0; delta] instead of three, so
            // that NW (larger than L1) is read and written once
            const int kk = l > 0 ? 3 * b : 2 * b;
            T* lhs = LH.data();
            T* rhs = RH.data();
            std::memcpy(lhs, s.act(j, l), sizeof(T) * b * di);
            std::memcpy(lhs + b * di, s.h(j, l), sizeof(T) * b * di);
            std::memcpy(rhs, cur, sizeof(T) * b * dl);
            std::memcpy(rhs + b * dl, X0[l].data(), sizeof(T) * b * dl);
            if (l > 0) {
              std::memcpy(lhs + 2 * b * di, de[l - 1].data(), sizeof(T) * b * di);
              std::memcpy(rhs + 2 * b * dl, s.delta(j, l), sizeof(T) * b * dl);
            }
            mm<T>(true, false, di, dl, kk, T(1), lhs, rhs, T(1), NW);
            mm<T>(true, false, di, dl, b, T(1), s.h(j, l), X1[l].data(), T(1), NS);
            if (l > 0) {
              mm<T>(false, true, b, di, dl, T(1), cur, W, T(1), da[l].data());
              const T* gz = s.z(j, l - 1);
              gelu_grad<T>(gz, da[l].data(), other, b * di);
              for (int t = 0; t < b * di; t++) other[t] += dzx[l - 1][t];
              std::swap(cur, other);
            } else {
              T* dKn = dK + (int64_t)n * b * D;
              std::memcpy(dKn, da[0].data(), sizeof(T) * b * D);
              mm<T>(false, true, b, D, dl, T(1), cur, W, T(1), dKn);
              if (p.residual)
                for (int t = 0; t < b * D; t++) dKn[t] += tmp[t];
            }
          }
          dE3p[n * 3] = eWW;
          dE3p[n * 3 + 1] = eSS;
          dE3p[n * 3 + 2] = eSW;
          std::swap(carry, spare);
        }
      }
      std::memcpy(dstate.data_ptr<T>() + bh * p.state_size, carry.data(), sizeof(T) * p.state_size);
    }
  });
  return {dq, dk, dv, dBF, dG, dE3, dGS, dstate, dtarget};
}

void check(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), "titans memory CPU kernel: tensors must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "titans memory CPU kernel: tensors must be contiguous");
    TORCH_CHECK(t.scalar_type() == ts[0].scalar_type(), "titans memory CPU kernel: mixed dtypes");
  }
}

}  // namespace

std::vector<at::Tensor> memory_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor BF, at::Tensor G,
                                       at::Tensor E3, at::Tensor GS, at::Tensor state, at::Tensor target,
                                       std::vector<int64_t> dims, int64_t K, bool residual, bool layer_norm,
                                       double ln_eps, bool save) {
  check({q, k, v, BF, G, E3, GS, state, target});
  if (q.scalar_type() == at::kDouble)
    return forward_impl<double>(q, k, v, BF, G, E3, GS, state, target, dims, K, residual, layer_norm, ln_eps, save);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "titans memory CPU kernel: float32 or float64 only");
  return forward_impl<float>(q, k, v, BF, G, E3, GS, state, target, dims, K, residual, layer_norm, ln_eps, save);
}

std::vector<at::Tensor> memory_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor BF, at::Tensor G,
                                        at::Tensor E3, at::Tensor GS, at::Tensor target, at::Tensor ckpt,
                                        at::Tensor dout, at::Tensor dfinal, std::vector<int64_t> dims, int64_t K,
                                        bool residual, bool layer_norm, double ln_eps) {
  check({q, k, v, BF, G, E3, GS, target, ckpt, dout, dfinal});
  if (q.scalar_type() == at::kDouble)
    return backward_impl<double>(q, k, v, BF, G, E3, GS, target, ckpt, dout, dfinal, dims, K, residual, layer_norm,
                                 ln_eps);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "titans memory CPU kernel: float32 or float64 only");
  return backward_impl<float>(q, k, v, BF, G, E3, GS, target, ckpt, dout, dfinal, dims, K, residual, layer_norm,
                              ln_eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &memory_forward, "Titans memory chunked dual form, forward (CPU)");
  m.def("backward", &memory_backward, "Titans memory chunked dual form, backward (CPU)");
}
