"""Throughput of the reference PyTorch DDPM (ddpm_reference.py), float32.

The PyTorch side of the performance comparison (tests/tools/perf_table.ts
reads this script's JSON with --torch): UNet forward, one training step as
the reference takes it (AdamW, clip 1.0, EMA 0.9999) and DDIM sampling
(eta = 0), on 32x32 single-channel images, timed as medians after warm-up
with the device synchronised. TF32 is switched off so that float32 means
float32 on Ampere and later GPUs.

    python3 tests/reference/bench_reference.py --base 64 --train-batch 64 --json out.json
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpm_reference import UNet, linear_schedule, train_step  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, reps, fn):
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def ddim(model, alphas_bar, n, steps, device):
    """DDIM (eta = 0) on the leading grid, as the Deno samplers' default."""
    T = len(alphas_bar)
    ts = list(range(0, T, T // steps))[::-1]
    ab = alphas_bar.to(device).float()
    x = torch.randn(n, 1, 32, 32, device=device)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = ab[t]
        a_prev = ab[t_prev] if t_prev >= 0 else torch.tensor(1.0, device=device)
        eps = model(x, torch.full((n,), t, device=device, dtype=torch.long))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=int, default=64)
    p.add_argument("--forward-batch", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    a = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    device = torch.device(a.device)
    model = UNet(1, a.base, 4 * a.base).to(device)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    _, _, alphas_bar, _ = linear_schedule()

    x = torch.randn(a.forward_batch, 1, 32, 32, device=device)
    t = torch.randint(0, 1000, (a.forward_batch,), device=device)
    with torch.no_grad():
        forward = timed(device, a.reps, lambda: model(x, t))
    x0 = torch.randn(a.train_batch, 1, 32, 32, device=device).clamp(-1, 1)
    train = timed(device, a.reps, lambda: train_step(model, ema, opt, x0, alphas_bar))
    sample = timed(
        device,
        max(1, a.reps // 2),
        lambda: ddim(model, alphas_bar, a.sample_batch, a.sample_steps, device),
    )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "base": a.base,
        "forward_batch": a.forward_batch,
        "train_batch": a.train_batch,
        "sample_batch": a.sample_batch,
        "sample_steps": a.sample_steps,
        "forward_img_s": a.forward_batch / forward,
        "train_img_s": a.train_batch / train,
        "ddim_img_s": a.sample_batch / sample,
    }
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
