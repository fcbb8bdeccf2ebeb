"""Variance-preserving diffusion in continuous time, and the DDIM sampler with classifier-free guidance.

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


@torch.no_grad()
def ddim_sample(eps_model, schedule, y, shape, *, w=0.0, steps=50, eta=0.0, null_class,
                generator=None, clip_x0=False):
    """Draw x0 samples with DDIM (Song et al. 2020, eq. 12) and classifier-free guidance.

    Guidance (Ho & Salimans 2022, eq. 6): eps~ = (1 + w) eps(z, c) - w eps(z, null). For w != 0 both
    terms come from ONE forward pass on the doubled batch [z; z] with labels [y; null].

    The grid is steps + 1 times spaced uniformly in t from 1 to 0, like DDIM's evenly strided
    timesteps: the schedule already decides how log-SNR is spread over t, so the grid adds no
    second warping of its own. The last step lands on t = 0 and returns the predicted clean x0.
    eta = 0 is deterministic DDIM, eta = 1 adds the noise of the DDPM posterior.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = y.device
    z = _randn(shape, generator, device)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alphas, sigmas = schedule.alpha_sigma(ts)
    null = torch.full_like(y, null_class)
    for i in range(steps):
        t = torch.full((shape[0],), ts[i].item(), device=device)
        if w == 0:
            eps = eps_model(z, t, y).float()
        else:
            eps_c, eps_u = eps_model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
            eps = (1 + w) * eps_c - w * eps_u
        alpha_t, sigma_t, alpha_s, sigma_s = (v.item() for v in (alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]))
        x0 = (z - sigma_t * eps) / alpha_t
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if i == steps - 1:
            break
        # eq. 16's sigma_t, in VP notation: the std of the fresh noise added on the way from t to s
        c = eta * (sigma_s / sigma_t) * math.sqrt(max(0.0, 1 - (alpha_t / alpha_s) ** 2))
        z = alpha_s * x0 + math.sqrt(max(0.0, sigma_s**2 - c**2)) * eps
        if c > 0:
            z = z + c * _randn(shape, generator, device)
    return x0
