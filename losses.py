"""The two training losses for classifier-free guidance, side by side.

standard (Ho & Salimans 2022, Algorithm 1): ||eps - eps(z_t, c~)||^2, where c~ is the class,
dropped to null with probability p_uncond.

aligned (Patel, Salamanca & Barba, arXiv 2311.00938): train the guided combination itself,
||eps - [(1 + w) eps(z_t, c~) - w eps(z_t, null)]||^2. With unlimited capacity it converges to
    eps(z, null) -> E[eps | z]
    eps(z, c)    -> (E[eps | z, c] + w E[eps | z]) / (1 + w)
so guided sampling at w' gives E[eps | z, c] + (w' - w) / (1 + w) * (E[eps | z, c] - E[eps | z]).
Sampling at w' = w is plain conditional sampling; the effective guidance is (w' - w) / (1 + w).
"""
import torch
import torch.nn.functional as F

from diffusion import add_noise


def _draws(x0, y, p_uncond, null_class):
    """t ~ U(0, 1), eps ~ N(0, I) and the label dropout, drawn in this order from torch's global RNG."""
    t = torch.rand(x0.shape[0], device=x0.device)
    eps = torch.randn_like(x0)
    drop = torch.rand(x0.shape[0], device=x0.device) < p_uncond
    return t, eps, torch.where(drop, torch.full_like(y, null_class), y)


def standard_loss(eps_model, schedule, x0, y, *, p_uncond=0.1, null_class):
    """Ho & Salimans 2022, Algorithm 1: mean of (eps - eps(z_t, c~))^2 over batch, channels and pixels."""
    t, eps, y_tilde = _draws(x0, y, p_uncond, null_class)
    z = add_noise(x0, t, eps, schedule)
    return F.mse_loss(eps_model(z, t, y_tilde).float(), eps)


def aligned_loss(eps_model, schedule, x0, y, *, w, p_uncond=0.1, null_class, detach_uncond=False):
    """arXiv 2311.00938: mean of (eps - [(1 + w) eps(z_t, c~) - w eps(z_t, null)])^2.

    Both terms come from one forward pass on [z_t; z_t] with labels [c~; null]. The label dropout is
    kept: where c~ = null the target collapses to eps(z_t, null), which trains the unconditional
    model; without it eps(z, null) is not identified and sampling at any other w is undefined.
    detach_uncond stops the gradient through the w eps(z_t, null) term.
    """
    t, eps, y_tilde = _draws(x0, y, p_uncond, null_class)
    z = add_noise(x0, t, eps, schedule)
    null = torch.full_like(y, null_class)
    eps_c, eps_u = eps_model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y_tilde, null])).float().chunk(2)
    if detach_uncond:
        eps_u = eps_u.detach()
    return F.mse_loss((1 + w) * eps_c - w * eps_u, eps)
