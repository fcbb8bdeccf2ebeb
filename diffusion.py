"""Variance-preserving diffusion in continuous time, and the DDIM and ancestral samplers with classifier-free guidance.

Time t runs over [0, 1]: t = 0 is data, t = 1 is (almost) pure noise. A schedule gives the
log signal-to-noise ratio log_snr(t) = lambda(t) = log(alpha^2 / sigma^2), and from it
alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1 always.
"""
import math

import torch

LOG_SNR_MAX = 20.0  # both schedules live in |lambda| <= 20, where sigma = 4.5e-5 is far below one 8-bit level


class Schedule:
    """A noise schedule, `kind` "linear" (DDPM) or "cosine" (Ho & Salimans' log-SNR schedule)."""

    def __init__(self, kind):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}: use 'linear' or 'cosine'")
        self.kind = kind

    def log_snr(self, t):
        """lambda(t), in the dtype of t, strictly decreasing and finite on the closed interval [0, 1].

        linear: DDPM's betas 1e-4..0.02 over T = 1000 steps in the continuous limit (Ho et al. 2020,
          sec. 4; Kingma et al. 2021, eq. 3), log alpha_bar(t) = -(beta0 T t + (beta1 - beta0) T t^2 / 2),
          so lambda = log alpha_bar - log(1 - alpha_bar). It is +inf at t = 0 exactly, so it is
          clamped at +20, which moves only t < 2e-8.
        cosine: lambda(t) = -2 log tan(a t + b) (Ho & Salimans 2022, sec. 4), spanning [-20, 20].
        """
        if self.kind == "linear":
            beta0, beta1, T = 1e-4, 0.02, 1000
            log_alpha_bar = -(beta0 * T * t + 0.5 * (beta1 - beta0) * T * t**2)
            # expm1 keeps 1 - alpha_bar accurate when alpha_bar is close to 1 (small t)
            return (log_alpha_bar - torch.log(-torch.expm1(log_alpha_bar))).clamp(max=LOG_SNR_MAX)
        b = math.atan(math.exp(-LOG_SNR_MAX / 2))
        a = math.atan(math.exp(LOG_SNR_MAX / 2)) - b
        return -2 * torch.log(torch.tan(a * t + b))

    def alpha_sigma(self, t):
        """(alpha, sigma) at t: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
        log_snr = self.log_snr(t)
        return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def _bcast(v, x):
    """Reshape a per-example [B] tensor to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0, t, eps, schedule):
    """z_t = alpha_t x0 + sigma_t eps, the forward process q(z_t | x0) (Kingma et al. 2021, eq. 1)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def _randn(shape, generator, device):
    """Standard normal noise; with a list of generators, image i is drawn from generator i alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def guided_eps(eps_model, z, t, y, w, null_class):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps~ = (1 + w) eps(z, c) - w eps(z, null). For w != 0
    both terms come from ONE forward pass on the doubled batch [z; z] with labels [y; null]; w = 0: batch B alone."""
    if w == 0:
        return eps_model(z, t, y).float()
    null = torch.full_like(y, null_class)
    eps_c, eps_u = eps_model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return (1 + w) * eps_c - w * eps_u


def _grid(schedule, steps, w, guidance_interval, w_unguided):
    """The times both samplers visit, with alpha, sigma, log_snr (float64, as Python floats) and each step's w.

    steps + 1 times spaced uniformly in t from 1 to 0, like DDIM's evenly strided timesteps: the schedule
    already decides how log-SNR is spread over t, so the grid adds no second warping of its own (for the
    cosine schedule this is Ho & Salimans' uniform grid). guidance_interval = (lo, hi) guides a step only
    where EDM's noise level sigma / alpha = exp(-lambda / 2) of its current time lies in (lo, hi]
    (Kynkaanniemi et al. 2024, arXiv 2404.07724); other steps use w_unguided, the checkpoint's unguided
    scale: 0 for a standard model, the training w for an aligned one (its w_eff = 0, see losses.py).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo, hi = (0.0, math.inf) if guidance_interval is None else guidance_interval  # every level is in (0, inf]
    if not 0 <= lo < hi:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi, got {guidance_interval}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    log_snr = schedule.log_snr(ts).tolist()
    alpha, sigma = (v.tolist() for v in schedule.alpha_sigma(ts))
    ws = [w if lo < math.exp(-lam / 2) <= hi else w_unguided for lam in log_snr]
    return ts.tolist(), alpha, sigma, log_snr, ws


@torch.no_grad()
def ddim_sample(eps_model, schedule, y, shape, *, w=0.0, steps=50, eta=0.0, null_class,
                generator=None, clip_x0=False, guidance_interval=None, w_unguided=0.0):
    """Draw x0 samples with DDIM (Song et al. 2020, eq. 12) and classifier-free guidance (guided_eps).

    The grid and guidance_interval are _grid's. The last step lands on t = 0 and returns the predicted
    clean x0. eta = 0 is deterministic DDIM, eta = 1 adds the noise of the DDPM posterior.
    """
    ts, alpha, sigma, _, ws = _grid(schedule, steps, w, guidance_interval, w_unguided)
    z = _randn(shape, generator, y.device)
    for i in range(steps):
        eps = guided_eps(eps_model, z, torch.full((shape[0],), ts[i], device=y.device), y, ws[i], null_class)
        alpha_t, sigma_t, alpha_s, sigma_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        x0 = (z - sigma_t * eps) / alpha_t
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        if i == steps - 1:
            break
        # eq. 16's sigma_t, in VP notation: the std of the fresh noise added on the way from t to s
        c = eta * (sigma_s / sigma_t) * math.sqrt(max(0.0, 1 - (alpha_t / alpha_s) ** 2))
        z = alpha_s * x0 + math.sqrt(max(0.0, sigma_s**2 - c**2)) * eps
        if c > 0:
            z = z + c * _randn(shape, generator, y.device)
    return x0


@torch.no_grad()
def ancestral_sample(eps_model, schedule, y, shape, *, w=0.0, steps=50, v=0.3, null_class,
                     generator=None, clip_x0=False, guidance_interval=None, w_unguided=0.0):
    """Draw x0 samples with Ho & Salimans 2022, Algorithm 2 (sec. 2), stepping lambda to a less noisy lambda':
    x~ = (z - sigma_lambda eps~) / alpha_lambda with the guided eps~ (guided_eps), then z' ~ N(mu~, var) with
    mu~ = e^(lambda - lambda') (alpha_lambda' / alpha_lambda) z + (1 - e^(lambda - lambda')) alpha_lambda' x~ and
    var = (sigma~^2)^(1 - v) (sigma^2_lambda|lambda')^v, which interpolates the posterior's sigma~^2 =
    (1 - e^(lambda - lambda')) sigma^2_lambda' (v = 0: DDPM's ancestral step, DDIM at eta = 1) and the forward
    process's sigma^2_lambda|lambda' = (1 - e^(lambda - lambda')) sigma^2_lambda (v = 1). They use v = 0.3 at
    64x64, 0.2 at 128x128. Grid and guidance_interval are _grid's; the last step returns x~.
    """
    if not 0 <= v <= 1:
        raise ValueError(f"v must be in [0, 1], got {v}")
    ts, alpha, sigma, log_snr, ws = _grid(schedule, steps, w, guidance_interval, w_unguided)
    z = _randn(shape, generator, y.device)
    for i in range(steps):
        eps = guided_eps(eps_model, z, torch.full((shape[0],), ts[i], device=y.device), y, ws[i], null_class)
        x0 = (z - sigma[i] * eps) / alpha[i]
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        if i == steps - 1:
            break
        snr_ratio = math.exp(log_snr[i] - log_snr[i + 1])  # e^(lambda - lambda') < 1, in float64
        mean = snr_ratio * (alpha[i + 1] / alpha[i]) * z + (1 - snr_ratio) * alpha[i + 1] * x0
        var = ((1 - snr_ratio) * sigma[i + 1] ** 2) ** (1 - v) * ((1 - snr_ratio) * sigma[i] ** 2) ** v
        z = mean + math.sqrt(var) * _randn(shape, generator, y.device)
    return x0
