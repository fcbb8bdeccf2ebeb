"""A compact class-conditional U-Net: DDPM's CIFAR-10 network (Ho et al. 2020, appendix B) plus a class embedding.

The default UNet() has 35,751,939 parameters: DDPM's 35.7M (35,746,307) plus 11 x 512 for the class embedding.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Norm32(nn.GroupNorm):
    """GroupNorm computed in float32: its variance in bf16/fp16 loses too many digits."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time (+ class) embedding added in between."""

    def __init__(self, c_in, c_out, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = Norm32(32, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = Norm32(32, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # as DDPM: each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, as DDPM uses at 16x16."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Norm32(32, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        # scaled_dot_product_attention keeps the softmax in float32 even under bf16/fp16 autocast
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


def timestep_embedding(t, dim):
    """Sinusoidal embedding of t * 1000, so the frequencies match DDPM's integer steps 0..999."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class UNet(nn.Module):
    """eps_theta(z_t, t, y): predicts the noise in z_t. y = num_classes is the null class ("no label").

    Valid widths: GroupNorm uses 32 groups, so ch * m must be divisible by 32 for every m in ch_mult
    (ch = 32, 64, 96, 128, ... with the default multipliers). img_size must be divisible by
    2 ** (len(ch_mult) - 1), and every entry of attn_res must be one of the resolutions visited.
    """

    def __init__(self, num_classes=10, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,),
                 dropout=0.1, img_size=32):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        if ch < 32 or any(c % 32 for c in widths):
            raise ValueError(f"ch={ch} with ch_mult={tuple(ch_mult)} gives widths {widths}: "
                             "each must be a positive multiple of 32 (GroupNorm uses 32 groups)")
        resolutions = [img_size // 2**i for i in range(len(ch_mult))]
        if img_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"img_size={img_size} must be divisible by {2 ** (len(ch_mult) - 1)} for {len(ch_mult)} levels")
        if any(r not in resolutions for r in attn_res):
            raise ValueError(f"attn_res={tuple(attn_res)} must be among the resolutions {resolutions}")
        self.num_classes, self.ch, self.img_size = num_classes, ch, img_size
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # the last row is the null class
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, c = [ch], ch
        for level, (width, res) in enumerate(zip(widths, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(c, width, emb_dim, dropout)]
                                               + ([Attention(width)] if res in attn_res else [])))
                c = width
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), Attention(c), ResBlock(c, c, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, res = widths[level], resolutions[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), width, emb_dim, dropout)]
                                             + ([Attention(width)] if res in attn_res else [])))
                c = width
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))

        self.norm_out = Norm32(32, c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # as DDPM: the untrained model predicts eps = 0
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y):
        emb = self.time_mlp(timestep_embedding(t, self.ch)) + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](h, emb)
                for attn in layer[1:]:
                    h = attn(h)
            else:
                h = layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](torch.cat([h, hs.pop()], dim=1), emb)
                for attn in layer[1:]:
                    h = attn(h)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
