"""Guided DDIM sampling from a checkpoint written by train.py."""
import contextlib
import os

import numpy as np
import torch
from PIL import Image

from diffusion import ddim_sample


def write_atomic(path, write):
    """Write a file through write(f) to a temporary name, then rename it: a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_grid(images, path, nrow):
    """Tile uint8 images [N, H, W, 3] into rows of nrow and write them as one PNG."""
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * h, nrow * w, 3), np.uint8)
    for i, img in enumerate(images):
        grid[(i // nrow) * h:(i // nrow + 1) * h, (i % nrow) * w:(i % nrow + 1) * w] = img
    write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


@torch.no_grad()
def sample_images(model, schedule, labels, *, null_class, w=0.0, steps=50, eta=0.0, clip_x0=True, seed=0,
                  batch_size=256, device="cpu", amp="none"):
    """Draw one image per label, as uint8 [N, H, W, 3]; image i comes from its own generator seeded seed + i.

    The generators live on the CPU, so the starting noise of image i is the same on every device and
    for every batch size.
    """
    device = torch.device(device)
    size = (3, model.img_size, model.img_size)
    channels_last = device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
                if amp != "none" else contextlib.nullcontext())

    def eps_model(z, t, y):
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with autocast:
            return model(z, t, y)

    labels = torch.as_tensor(labels, dtype=torch.long)
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(start, start + len(y))]
        x = ddim_sample(eps_model, schedule, y, (len(y), *size), w=w, steps=steps, eta=eta,
                        null_class=null_class, generator=gens, clip_x0=clip_x0)
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)
