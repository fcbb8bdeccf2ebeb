"""Three training losses for classifier-free guidance, side by side.

standard (Ho & Salimans 2022, Algorithm 1): ||eps - eps(z_t, c~)||^2, where c~ is the class,
dropped to null with probability p_uncond.

aligned (Patel, Salamanca & Barba, arXiv 2311.00938): train the guided combination itself,
||eps - [(1 + w) eps(z_t, c~) - w eps(z_t, null)]||^2. With unlimited capacity it converges to
    eps(z, null) -> E[eps | z]
    eps(z, c)    -> (E[eps | z, c] + w E[eps | z]) / (1 + w)
so guided sampling at w' gives E[eps | z, c] + (w' - w) / (1 + w) * (E[eps | z, c] - E[eps | z]).
Sampling at w' = w is plain conditional sampling; the effective guidance is (w' - w) / (1 + w).

guidance-free (model guidance, Tang et al. 2025, arXiv 2502.12154; GFT, arXiv 2501.15420, has the same aim): for a
kept label c the target is eps + u sg(eps_T(z_t, c) - eps_T(z_t, null)), u = W / (1 + W), with eps_T a teacher; for
a dropped label it is eps. With unlimited capacity eps(z, null) -> E[eps | z] and eps(z, c) -> E[eps | z, c] +
u (eps_T(z, c) - eps_T(z, null)). As the teacher becomes the model, eps(z, c) = E[eps | z, c] + u (eps(z, c) -
E[eps | z]) has the one solution eps(z, c) = E[eps | z, c] + W (E[eps | z, c] - E[eps | z]): CFG at W, from one
forward pass at w' = 0. Sampled at w' the effective guidance is W + w' (1 + W). Each round of teacher updates
shrinks the distance to that solution by the factor u, so it is reached ever more slowly as W grows (u -> 1), and
for u >= 1 (W <= -1) there is none: the loss refuses such W.
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


def guidance_free_loss(eps_model, teacher, schedule, x0, y, *, w, p_uncond=0.1, null_class, guide=True, t_range=(0, 1)):
    """Model guidance (arXiv 2502.12154): mean of (eps + u m sg(eps_T(z_t, c~) - eps_T(z_t, null)) - eps(z_t, c~))^2,
    u = w / (1 + w), m = 1 for a kept label with t in t_range (and guide) and 0 otherwise, so that eps(z, null) still
    learns plain eps. The teacher runs without gradient, in one forward pass on [z_t; z_t]. train.py passes its
    EMA weights: a slowly moving copy, so the target does not chase the step that fits it (as in BYOL or
    consistency training), and one that exists already, at no cost."""
    u = w / (1 + w) if w > -1 else float("inf")
    if not u < 1:
        raise ValueError(f"guidance-free loss: w = {w:g} gives u = w / (1 + w) >= 1, which has no fixed point; use w > -1")
    t, eps, y_tilde = _draws(x0, y, p_uncond, null_class)
    z = add_noise(x0, t, eps, schedule)
    target = eps
    if guide:
        with torch.no_grad():
            eps_c, eps_u = teacher(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y_tilde, torch.full_like(y, null_class)])
                                   ).float().chunk(2)
        m = ((y_tilde != null_class) & (t >= t_range[0]) & (t <= t_range[1])).float().reshape(-1, *[1] * (x0.dim() - 1))
        target = eps + u * m * (eps_c - eps_u)
    return F.mse_loss(eps_model(z, t, y_tilde).float(), target)
