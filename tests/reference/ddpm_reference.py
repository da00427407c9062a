"""The reference PyTorch DDPM that ddpm reproduces (Ho et al. 2020 on MNIST).

This file is the ground truth for parameter names, layouts and the forward
pass. It needs PyTorch and is not run by CI (CI has no PyTorch); the numpy
twin `numpy_unet.py` beside it generates the test fixtures, and on a machine
with PyTorch `python3 ddpm_reference.py --check FIXTURE` compares the two.

Architecture (images 32x32, NCHW here; the Deno module computes NHWC):

    t -> sinusoidal(time_dim) -> Linear -> SiLU -> Linear           "time.mlp.{0,2}"
    x -> in_conv (3x3, base)                                        32x32
      -> down1 ResBlock(base, base)            = s1                  32x32
      -> ds1  3x3 stride 2 pad 1                                     16x16
      -> down2 ResBlock(base, 2 base)          = s2                  16x16
      -> ds2  3x3 stride 2 pad 1                                      8x8
      -> mid1 ResBlock(2 base, 4 base) -> mid2 ResBlock(4 base, 4 base)
      -> us2  ConvTranspose 4x4 stride 2 pad 1 (4 base -> 2 base)   16x16
      -> cat(s2) -> up2 ResBlock(4 base, 2 base)
      -> us1  ConvTranspose 4x4 stride 2 pad 1 (2 base -> base)     32x32
      -> cat(s1) -> up1 ResBlock(2 base, base)
      -> out_norm GroupNorm(8) -> SiLU -> out_conv 3x3 -> eps

    ResBlock(in, out): h = conv1(SiLU(norm1(x))) + time_proj(SiLU(temb))[:, :, None, None]
                       h = conv2(SiLU(norm2(h)))
                       return h + skip(x)      (skip = 1x1 conv when in != out, else identity)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(sinusoidal_embedding(t, self.dim))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    def __init__(self, in_ch: int = 1, base: int = 64, time_dim: int = 256):
        super().__init__()
        self.time = TimeEmbedding(time_dim)
        self.in_conv = nn.Conv2d(in_ch, base, 3, padding=1)
        self.down1 = ResBlock(base, base, time_dim)
        self.ds1 = nn.Conv2d(base, base, 3, stride=2, padding=1)
        self.down2 = ResBlock(base, base * 2, time_dim)
        self.ds2 = nn.Conv2d(base * 2, base * 2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(base * 2, base * 4, time_dim)
        self.mid2 = ResBlock(base * 4, base * 4, time_dim)
        self.us2 = nn.ConvTranspose2d(base * 4, base * 2, 4, stride=2, padding=1)
        self.up2 = ResBlock(base * 4, base * 2, time_dim)
        self.us1 = nn.ConvTranspose2d(base * 2, base, 4, stride=2, padding=1)
        self.up1 = ResBlock(base * 2, base, time_dim)
        self.out_norm = nn.GroupNorm(8, base)
        self.out_conv = nn.Conv2d(base, in_ch, 3, padding=1)

    def forward(self, x, t):
        temb = self.time(t)
        h = self.in_conv(x)
        s1 = self.down1(h, temb)
        s2 = self.down2(self.ds1(s1), temb)
        h = self.mid2(self.mid1(self.ds2(s2), temb), temb)
        h = self.up2(torch.cat([self.us2(h), s2], dim=1), temb)
        h = self.up1(torch.cat([self.us1(h), s1], dim=1), temb)
        return self.out_conv(F.silu(self.out_norm(h)))


def linear_schedule(T=1000, beta_start=1e-4, beta_end=0.02):
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    alphas = 1.0 - betas
    alphas_bar = torch.cumprod(alphas, 0)
    alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
    posterior_variance = betas * (1 - alphas_bar_prev) / (1 - alphas_bar)
    return betas, alphas, alphas_bar, posterior_variance


def train_step(model, ema, opt, x0, alphas_bar):
    """One reference training step: loss = mse(eps_theta(x_t, t), eps)."""
    t = torch.randint(0, len(alphas_bar), (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    ab = alphas_bar.to(x0.device).float()[t][:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    loss = F.mse_loss(model(xt, t), eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(0.9999).add_(p, alpha=1 - 0.9999)
    return loss.item()


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        # Compare this module with a fixture written by numpy_unet.py.
        from safetensors.torch import load_file

        tensors = load_file(sys.argv[2])
        weights = {k: v for k, v in tensors.items() if not k.startswith("fixture.")}
        base = weights["in_conv.weight"].shape[0]
        in_ch = weights["in_conv.weight"].shape[1]
        time_dim = weights["time.mlp.0.weight"].shape[0]
        model = UNet(in_ch, base, time_dim)
        model.load_state_dict(weights)
        x = tensors["fixture.x"].permute(0, 3, 1, 2)  # NHWC -> NCHW
        eps = model(x, tensors["fixture.t"].long()).permute(0, 2, 3, 1)
        err = (eps - tensors["fixture.eps"]).abs().max().item()
        print(f"max |torch - numpy| = {err:.3g}")
        sys.exit(0 if err < 1e-4 else 1)
    print(__doc__)
