// A policy's step through an affine/PReLU flow on the CPU: the maths of _FusedPReLUFlow
// (flowpolicy/flows.py), one sample per parameter set.
//
// In eager PyTorch a 6-D flow step is ~60 tiny kernels of 3-10 us each, whatever their size.
// Here the transcendental functions run as a few vectorized ATen calls over the whole batch
// (a scalar exp or log per element would cost more than the rest), and the chain's arithmetic
// runs as one loop that takes each sample through every layer.
//
// Layout of the raw parameters theta (B, P): layers alternate affine (A values) and PReLU
// (d log-slopes), ending on affine, so affine layer k starts at k * period, period = A + d.
// An affine layer is [shift (d) | raw diagonal (d) | strictly lower entries of L, row by row
// (d(d-1)/2) | factor F (d x r, row-major)], with diag L = softplus(raw + offset) + eps; it maps
// its input x to p = L w + shift with u = F^T x, w = x + F u, and its log-det is
// sum log diag L + log det(I + F^T F). Each PReLU maps p to exp(log_alpha) p where p < 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {

struct Layout {
  int64_t d, r, n, period, affine;  // dim, rank, affine layers, period, affine size
  bool squash;
  double diag_offset, eps;

  // per affine layer, the trace holds its input x, w and its output p (d each) and u (r)
  int64_t stride() const { return 3 * d + r; }
};

Layout make_layout(const at::Tensor& z, const at::Tensor& theta, int64_t rank, int64_t layers,
                   bool squash, double diag_offset, double eps) {
  TORCH_CHECK(z.device().is_cpu() && theta.device().is_cpu(), "prelu_flow: CPU tensors only");
  TORCH_CHECK(z.dim() == 2 && theta.dim() == 2 && z.size(0) == theta.size(0),
              "prelu_flow: expected z (B, d) and theta (B, P)");
  TORCH_CHECK(z.scalar_type() == theta.scalar_type(), "prelu_flow: z and theta dtypes differ");
  TORCH_CHECK(0 <= rank && rank <= 2 && layers >= 0, "prelu_flow: rank 0..2, layers >= 0");
  const int64_t d = z.size(1), affine = d + d * (d + 1) / 2 + d * rank;
  TORCH_CHECK(theta.size(1) == (layers + 1) * affine + layers * d,
              "prelu_flow: theta's size does not match the layout");
  return Layout{d, rank, layers + 1, affine + d, affine, squash, diag_offset, eps};
}

// (B, layers, d) views of theta: every affine layer's raw diagonal, every PReLU's log-slopes
at::Tensor raw_diagonals(const at::Tensor& theta, const Layout& s) {
  return theta.as_strided({theta.size(0), s.n, s.d}, {theta.size(1), s.period, 1},
                          theta.storage_offset() + s.d);
}

at::Tensor log_slopes(const at::Tensor& theta, const Layout& s) {
  return theta.as_strided({theta.size(0), s.n - 1, s.d}, {theta.size(1), s.period, 1},
                          theta.storage_offset() + s.affine);
}

// A copy to work on in place: ATen's vectorized exp and log are fast on contiguous inputs only
// (.contiguous() would return the view itself when it happens to be contiguous, for B = 1).
at::Tensor contiguous_copy(const at::Tensor& view) {
  return view.clone(at::MemoryFormat::Contiguous);
}

// The Gram entries a = |f|^2, b = f . g, c = |g|^2 of the factor's columns f, g (rank <= 2;
// zero without a factor).
template <typename T>
void gram(const T* f, int64_t d, int64_t r, T& a, T& b, T& c) {
  a = b = c = 0;
  for (int64_t i = 0; r > 0 && i < d; ++i) {
    a += f[i * r] * f[i * r];
    if (r == 2) {
      b += f[2 * i] * f[2 * i + 1];
      c += f[2 * i + 1] * f[2 * i + 1];
    }
  }
}

// One sample through the chain: the trace, det(I + F^T F) - 1 of each layer (cap, for log1p),
// the PReLUs' log-dets (returned), and the last affine output p_out.
template <typename T>
T chain_forward(const Layout& s, const T* theta, const T* diag, const T* alpha, const T* z,
                T* trace, T* cap, T* p_out) {
  const int64_t d = s.d, r = s.r, lower_size = d * (d - 1) / 2;
  T ladj = 0;
  std::copy(z, z + d, trace);
  for (int64_t k = 0; k < s.n; ++k) {
    const T* a = theta + k * s.period;
    const T *shift = a, *lower = a + 2 * d, *f = a + 2 * d + lower_size;
    const T* dk = diag + k * d;
    T* x = trace + k * s.stride();
    T *w = x + d, *p = w + d, *u = p + d;
    T ga, gb, gc;
    gram(f, d, r, ga, gb, gc);
    cap[k] = r == 2 ? ga + gc + ga * gc - gb * gb : ga;  // det - 1 >= 0
    for (int64_t j = 0; j < r; ++j) {
      u[j] = 0;
      for (int64_t i = 0; i < d; ++i) u[j] += f[i * r + j] * x[i];
    }
    for (int64_t i = 0; i < d; ++i) {
      w[i] = x[i];
      for (int64_t j = 0; j < r; ++j) w[i] += f[i * r + j] * u[j];
    }
    const T* row = lower;  // row i of L's strictly lower part has i entries
    for (int64_t i = 0; i < d; ++i, row += i - 1) {
      T acc = shift[i] + dk[i] * w[i];
      for (int64_t j = 0; j < i; ++j) acc += row[j] * w[j];
      p[i] = acc;
    }
    if (k == s.n - 1) {
      std::copy(p, p + d, p_out);
    } else {
      const T *log_alpha = a + s.affine, *ak = alpha + k * d;
      T* next = trace + (k + 1) * s.stride();
      for (int64_t i = 0; i < d; ++i) {
        const bool negative = p[i] < 0;
        next[i] = negative ? ak[i] * p[i] : p[i];
        ladj += negative ? log_alpha[i] : T(0);
      }
    }
  }
  return ladj;
}

// One sample back through the chain, from g, the gradient of the last affine output p, and gl,
// that of the log-det: the formulas of _FusedPReLUFlow.backward in flows.py.
template <typename T>
void chain_backward(const Layout& s, const T* theta, const T* diag, const T* sigmoid,
                    const T* alpha, const T* trace, T gl, T* g, T* gw, T* grad_theta) {
  const int64_t d = s.d, r = s.r, lower_size = d * (d - 1) / 2;
  for (int64_t k = s.n - 1; k >= 0; --k) {
    const T* a = theta + k * s.period;
    const T *lower = a + 2 * d, *f = a + 2 * d + lower_size;
    const T *dk = diag + k * d, *sk = sigmoid + k * d;
    T* ga = grad_theta + k * s.period;
    T *g_shift = ga, *g_raw_diag = ga + d, *g_lower = ga + 2 * d, *g_f = ga + 2 * d + lower_size;
    const T* x = trace + k * s.stride();
    const T *w = x + d, *u = w + 2 * d;
    // p = L w + shift: of the shift, of L (its diagonal also in the log-det), and gw = L^T g
    const T* row = lower;
    T* g_row = g_lower;
    for (int64_t i = 0; i < d; ++i) gw[i] = dk[i] * g[i];
    for (int64_t i = 0; i < d; ++i, row += i - 1, g_row += i - 1) {
      g_shift[i] = g[i];
      g_raw_diag[i] = (g[i] * w[i] + gl / dk[i]) * sk[i];  // softplus' derivative: sigmoid
      for (int64_t j = 0; j < i; ++j) {
        g_row[j] = g[i] * w[j];
        gw[j] += row[j] * g[i];
      }
    }
    // w = x + F u, u = F^T x, and log det(I + F^T F) with gradient 2 F (I + F^T F)^-1
    T ga_, gb, gc;
    gram(f, d, r, ga_, gb, gc);
    const T scale = r == 2 ? 2 / ((1 + ga_) * (1 + gc) - gb * gb) : 2 / (1 + ga_);
    T t[2] = {0, 0};
    for (int64_t j = 0; j < r; ++j)
      for (int64_t i = 0; i < d; ++i) t[j] += f[i * r + j] * gw[i];
    for (int64_t i = 0; i < d; ++i) {
      g[i] = gw[i];
      if (r == 1) {
        g_f[i] = gw[i] * u[0] + x[i] * t[0] + gl * scale * f[i];
        g[i] += f[i] * t[0];
      } else if (r == 2) {
        const T fi = f[2 * i], gi = f[2 * i + 1];
        g_f[2 * i] = gw[i] * u[0] + x[i] * t[0] + gl * scale * ((1 + gc) * fi - gb * gi);
        g_f[2 * i + 1] = gw[i] * u[1] + x[i] * t[1] + gl * scale * ((1 + ga_) * gi - gb * fi);
        g[i] += fi * t[0] + gi * t[1];
      }
    }
    if (k > 0) {  // through the PReLU before this layer (x = alpha p where p < 0)
      const T* p = trace + (k - 1) * s.stride() + 2 * d;
      const T* ak = alpha + (k - 1) * d;
      T* g_log_alpha = ga - d;
      for (int64_t i = 0; i < d; ++i) {
        const bool negative = p[i] < 0;
        g_log_alpha[i] = negative ? g[i] * x[i] + gl : T(0);
        g[i] = negative ? g[i] * ak[i] : g[i];
      }
    }
  }
}

// (y, log-det, and what the backward needs: trace, diag L, slopes)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prelu_flow_forward(
    const at::Tensor& z_, const at::Tensor& theta_, int64_t rank, int64_t layers, bool squash,
    double diag_offset, double eps) {
  const Layout s = make_layout(z_, theta_, rank, layers, squash, diag_offset, eps);
  const at::Tensor z = z_.contiguous(), theta = theta_.contiguous();
  const int64_t batch = z.size(0), P = theta.size(1), d = s.d;
  const at::Tensor raw_diag = contiguous_copy(raw_diagonals(theta, s)).add_(diag_offset);
  const at::Tensor diag = at::softplus(raw_diag).add_(eps);
  const at::Tensor alpha = contiguous_copy(log_slopes(theta, s)).exp_();
  at::Tensor trace = at::empty({batch, s.n, s.stride()}, z.options());
  at::Tensor cap = at::empty({batch, s.n}, z.options()), p = at::empty_like(z);
  at::Tensor ladj = at::empty({batch}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "prelu_flow_forward", [&] {
    const scalar_t *zp = z.const_data_ptr<scalar_t>(), *tp = theta.const_data_ptr<scalar_t>();
    const scalar_t *dp = diag.const_data_ptr<scalar_t>(), *ap = alpha.const_data_ptr<scalar_t>();
    scalar_t *trp = trace.mutable_data_ptr<scalar_t>(), *cp = cap.mutable_data_ptr<scalar_t>();
    scalar_t *pp = p.mutable_data_ptr<scalar_t>(), *lp = ladj.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        lp[b] = chain_forward(s, tp + b * P, dp + b * s.n * d, ap + b * (s.n - 1) * d,
                              zp + b * d, trp + b * s.n * s.stride(), cp + b * s.n, pp + b * d);
    });
  });
  ladj.add_(diag.log().sum({1, 2}));
  if (rank > 0) ladj.add_(cap.log1p_().sum(1));
  at::Tensor y = p;
  if (squash) {  // log(1 - tanh(p)^2) = 2 (log 2 - p - softplus(-2 p)), finite for any p
    ladj.sub_(at::softplus(p * -2).add_(p).sum(1), 2).add_(2 * d * std::log(2.0));
    y = p.tanh();
  }
  return {y, ladj, trace, diag, alpha};
}

std::tuple<at::Tensor, at::Tensor> prelu_flow_backward(
    const at::Tensor& grad_y_, const at::Tensor& grad_ladj_, const at::Tensor& theta_,
    const at::Tensor& y, const at::Tensor& trace, const at::Tensor& diag, const at::Tensor& alpha,
    int64_t rank, int64_t layers, bool squash, double diag_offset, double eps) {
  const Layout s = make_layout(y, theta_, rank, layers, squash, diag_offset, eps);
  const at::Tensor theta = theta_.contiguous(), grad_ladj = grad_ladj_.contiguous();
  TORCH_CHECK(grad_y_.sizes() == y.sizes() && grad_ladj.numel() == y.size(0),
              "prelu_flow_backward: gradient shapes do not match");
  const int64_t batch = y.size(0), P = theta.size(1), d = s.d;
  // of the last affine output: through tanh, whose log-det has derivative -2 tanh
  at::Tensor g = squash ? grad_y_ * (1 - y * y) - 2 * grad_ladj.unsqueeze(-1) * y
                        : grad_y_.contiguous().clone();
  const at::Tensor sigmoid = contiguous_copy(raw_diagonals(theta, s)).add_(diag_offset).sigmoid_();
  at::Tensor grad_theta = at::empty_like(theta), gw = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "prelu_flow_backward", [&] {
    const scalar_t *tp = theta.const_data_ptr<scalar_t>(), *dp = diag.const_data_ptr<scalar_t>();
    const scalar_t *sp = sigmoid.const_data_ptr<scalar_t>(), *ap = alpha.const_data_ptr<scalar_t>();
    const scalar_t* trp = trace.const_data_ptr<scalar_t>();
    const scalar_t* glp = grad_ladj.const_data_ptr<scalar_t>();
    scalar_t *gp = g.mutable_data_ptr<scalar_t>(), *gwp = gw.mutable_data_ptr<scalar_t>();
    scalar_t* gtp = grad_theta.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        chain_backward(s, tp + b * P, dp + b * s.n * d, sp + b * s.n * d,
                       ap + b * (s.n - 1) * d, trp + b * s.n * s.stride(), glp[b], gp + b * d,
                       gwp + b * d, gtp + b * P);
    });
  });
  return {g, grad_theta};  // g is now the gradient of z
}

}  // namespace

TORCH_LIBRARY(flowpolicy, m) {
  m.def(
      "prelu_flow_forward(Tensor z, Tensor theta, int rank, int layers, bool squash, "
      "float diag_offset, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      &prelu_flow_forward);
  m.def(
      "prelu_flow_backward(Tensor grad_y, Tensor grad_ladj, Tensor theta, Tensor y, "
      "Tensor trace, Tensor diag, Tensor alpha, int rank, int layers, bool squash, "
      "float diag_offset, float eps) -> (Tensor, Tensor)",
      &prelu_flow_backward);
}
