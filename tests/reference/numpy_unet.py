"""An independent numpy forward of ddpm_reference.py's UNet, and the fixtures it proves layouts with.

Everything here is written from the PyTorch documentation's definitions, in
NCHW with PyTorch's parameter layouts, computed in float64:

    Conv2d           weight [out, in, kh, kw]   (cross-correlation, zero padding)
    ConvTranspose2d  weight [in, out, kh, kw]   (scatter-add, then crop `padding`)
    Linear           weight [out, in]           y = x W^T + b
    GroupNorm        biased variance over (C/G, H, W), eps 1e-5

The pieces are checked against each other before anything is written: conv2d
against a scalar-loop definition, conv_transpose2d as the adjoint of conv2d
(<A x, y> = <x, A^T y>), group_norm against a per-group loop.

Run from the repository root:

    python3 tests/reference/numpy_unet.py

It writes tests/fixtures/unet_base8.safetensors (inChannels 1) and
tests/fixtures/unet_base8_rgb.safetensors (inChannels 3): the state_dict in
PyTorch layouts (float32), plus `fixture.x` (NHWC float32 [2, 32, 32, C]),
`fixture.t` (int32 [2]) and `fixture.eps` (NHWC float32, this forward's
output). The safetensors writer is by hand (no safetensors package needed).
On a machine with PyTorch, `python3 ddpm_reference.py --check FIXTURE`
compares this forward with the reference module.
"""
import json
import math
import os
import struct
import sys

import numpy as np

GN_EPS = 1e-5
GROUPS = 8


# ---------------------------------------------------------------- primitives


def conv2d(x, w, b, stride=1, padding=0):
    """out[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * xpad[n, c, i*s + u, j*s + v]."""
    n, c, h, wd = x.shape
    o, c2, kh, kw = w.shape
    assert c == c2, (x.shape, w.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for u in range(kh):
        for v in range(kw):
            patch = xp[:, :, u : u + stride * (ho - 1) + 1 : stride, v : v + stride * (wo - 1) + 1 : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, u, v])
    if b is not None:
        out += b[None, :, None, None]
    return out


def conv_transpose2d(x, w, b, stride=1, padding=0):
    """Scatter: full[n, o, i*s + u, j*s + v] += x[n, c, i, j] * w[c, o, u, v]; crop `padding` each side."""
    n, c, h, wd = x.shape
    c2, o, kh, kw = w.shape
    assert c == c2, (x.shape, w.shape)
    full = np.zeros((n, o, (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for u in range(kh):
        for v in range(kw):
            full[:, :, u : u + stride * (h - 1) + 1 : stride, v : v + stride * (wd - 1) + 1 : stride] += np.einsum(
                "nchw,co->nohw", x, w[:, :, u, v]
            )
    out = full[:, :, padding : full.shape[2] - padding, padding : full.shape[3] - padding]
    if b is not None:
        out = out + b[None, :, None, None]
    return out


def group_norm(x, groups, gamma, beta, eps=GN_EPS):
    n, c, h, w = x.shape
    g = x.reshape(n, groups, c // groups, h, w)
    mean = g.mean(axis=(2, 3, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(2, 3, 4), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(n, c, h, w)
    return y * gamma[None, :, None, None] + beta[None, :, None, None]


def silu(x):
    return x / (1.0 + np.exp(-x))


def linear(x, w, b):
    return x @ w.T + b


def sinusoidal_embedding(t, dim):
    """As the reference computes it: frequencies and arguments in float32, sin/cos of those."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float64) * -scale).astype(np.float32)
    args = (t.astype(np.float32)[:, None] * freqs[None, :]).astype(np.float64)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


# ---------------------------------------------------------------- the model


def resblock(p, name, x, temb):
    h = conv2d(silu(group_norm(x, GROUPS, p[f"{name}.norm1.weight"], p[f"{name}.norm1.bias"])),
               p[f"{name}.conv1.weight"], p[f"{name}.conv1.bias"], 1, 1)
    h = h + linear(silu(temb), p[f"{name}.time_proj.weight"], p[f"{name}.time_proj.bias"])[:, :, None, None]
    h = conv2d(silu(group_norm(h, GROUPS, p[f"{name}.norm2.weight"], p[f"{name}.norm2.bias"])),
               p[f"{name}.conv2.weight"], p[f"{name}.conv2.bias"], 1, 1)
    skip = conv2d(x, p[f"{name}.skip.weight"], p[f"{name}.skip.bias"]) if f"{name}.skip.weight" in p else x
    return h + skip


def unet_forward(p, x, t):
    """x: NCHW float64, t: integer [N]; p: state_dict (PyTorch layouts) as float64 arrays."""
    time_dim = p["time.mlp.0.weight"].shape[0]
    e = sinusoidal_embedding(t, time_dim)
    temb = linear(silu(linear(e, p["time.mlp.0.weight"], p["time.mlp.0.bias"])),
                  p["time.mlp.2.weight"], p["time.mlp.2.bias"])
    h = conv2d(x, p["in_conv.weight"], p["in_conv.bias"], 1, 1)
    s1 = resblock(p, "down1", h, temb)
    s2 = resblock(p, "down2", conv2d(s1, p["ds1.weight"], p["ds1.bias"], 2, 1), temb)
    h = resblock(p, "mid1", conv2d(s2, p["ds2.weight"], p["ds2.bias"], 2, 1), temb)
    h = resblock(p, "mid2", h, temb)
    h = resblock(p, "up2", np.concatenate([conv_transpose2d(h, p["us2.weight"], p["us2.bias"], 2, 1), s2], axis=1), temb)
    h = resblock(p, "up1", np.concatenate([conv_transpose2d(h, p["us1.weight"], p["us1.bias"], 2, 1), s1], axis=1), temb)
    return conv2d(silu(group_norm(h, GROUPS, p["out_norm.weight"], p["out_norm.bias"])),
                  p["out_conv.weight"], p["out_conv.bias"], 1, 1)


def param_shapes(in_ch, base, time_dim):
    """The reference's state_dict names and shapes, in state_dict order."""
    shapes = {
        "time.mlp.0.weight": (time_dim, time_dim), "time.mlp.0.bias": (time_dim,),
        "time.mlp.2.weight": (time_dim, time_dim), "time.mlp.2.bias": (time_dim,),
        "in_conv.weight": (base, in_ch, 3, 3), "in_conv.bias": (base,),
    }

    def res(name, i, o):
        shapes.update({
            f"{name}.norm1.weight": (i,), f"{name}.norm1.bias": (i,),
            f"{name}.conv1.weight": (o, i, 3, 3), f"{name}.conv1.bias": (o,),
            f"{name}.time_proj.weight": (o, time_dim), f"{name}.time_proj.bias": (o,),
            f"{name}.norm2.weight": (o,), f"{name}.norm2.bias": (o,),
            f"{name}.conv2.weight": (o, o, 3, 3), f"{name}.conv2.bias": (o,),
        })
        if i != o:
            shapes.update({f"{name}.skip.weight": (o, i, 1, 1), f"{name}.skip.bias": (o,)})

    res("down1", base, base)
    shapes.update({"ds1.weight": (base, base, 3, 3), "ds1.bias": (base,)})
    res("down2", base, 2 * base)
    shapes.update({"ds2.weight": (2 * base, 2 * base, 3, 3), "ds2.bias": (2 * base,)})
    res("mid1", 2 * base, 4 * base)
    res("mid2", 4 * base, 4 * base)
    shapes.update({"us2.weight": (4 * base, 2 * base, 4, 4), "us2.bias": (2 * base,)})
    res("up2", 4 * base, 2 * base)
    shapes.update({"us1.weight": (2 * base, base, 4, 4), "us1.bias": (base,)})
    res("up1", 2 * base, base)
    shapes.update({
        "out_norm.weight": (base,), "out_norm.bias": (base,),
        "out_conv.weight": (in_ch, base, 3, 3), "out_conv.bias": (in_ch,),
    })
    return shapes


def init_params(rng, in_ch, base, time_dim):
    """PyTorch's default init (kaiming_uniform(a=sqrt 5): U(+-1/sqrt(fan_in)) for weight and bias),
    except GroupNorm affine terms, drawn away from (1, 0) so that a permuted one changes the output.
    fan_in is weight.shape[1] * kh * kw, which for ConvTranspose2d is out_ch * kh * kw, as in torch."""
    p = {}
    shapes = param_shapes(in_ch, base, time_dim)
    for name, shape in shapes.items():
        module, kind = name.rsplit(".", 1)
        if "norm" in module:
            p[name] = rng.uniform(0.5, 1.5, shape) if kind == "weight" else rng.uniform(-0.5, 0.5, shape)
            continue
        wshape = shapes[module + ".weight"]
        fan_in = wshape[1] * (int(np.prod(wshape[2:])) if len(wshape) == 4 else 1)
        bound = 1.0 / math.sqrt(fan_in)
        p[name] = rng.uniform(-bound, bound, shape)
    # Round to float32 once: the file holds float32, and the forward runs on exactly those values.
    return {k: v.astype(np.float32) for k, v in p.items()}


# ---------------------------------------------------------------- self-checks


def check_pieces(rng):
    # conv2d against the scalar definition, stride 2 with padding.
    x = rng.standard_normal((2, 3, 7, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    out = conv2d(x, w, b, 2, 1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros((2, 4, 4, 3))
    for n in range(2):
        for o in range(4):
            for i in range(4):
                for j in range(3):
                    ref[n, o, i, j] = b[o] + sum(
                        w[o, c, u, v] * xp[n, c, 2 * i + u, 2 * j + v]
                        for c in range(3) for u in range(3) for v in range(3)
                    )
    assert np.abs(out - ref).max() < 1e-12, "conv2d disagrees with its definition"

    # conv_transpose2d(k4, s2, p1) is the adjoint of conv2d(k4, s2, p1) with the same weight array:
    # conv weight [o, c, u, v] read as transposed-conv weight [in = o, out = c, u, v].
    for (h, k, s, pad) in [(8, 4, 2, 1), (5, 3, 2, 1), (6, 3, 1, 1)]:
        x = rng.standard_normal((2, 3, h, h))
        w = rng.standard_normal((5, 3, k, k))
        ax = conv2d(x, w, None, s, pad)
        y = rng.standard_normal(ax.shape)
        aty = conv_transpose2d(y, w, None, s, pad)
        assert aty.shape == x.shape, (aty.shape, x.shape)
        lhs, rhs = np.sum(ax * y), np.sum(x * aty)
        assert abs(lhs - rhs) < 1e-9 * max(1.0, abs(lhs)), f"<Ax, y> != <x, A^T y> for k={k} s={s}"
    assert conv_transpose2d(np.zeros((1, 3, 8, 8)), np.zeros((3, 2, 4, 4)), None, 2, 1).shape == (1, 2, 16, 16)

    # group_norm against a per-group loop.
    x = rng.standard_normal((2, 16, 3, 5))
    gamma, beta = rng.standard_normal(16), rng.standard_normal(16)
    out = group_norm(x, 8, gamma, beta)
    ref = np.empty_like(x)
    for n in range(2):
        for g in range(8):
            sl = x[n, 2 * g : 2 * g + 2]
            m = sl.mean()
            v = ((sl - m) ** 2).mean()
            for c in range(2):
                ch = 2 * g + c
                ref[n, ch] = (x[n, ch] - m) / math.sqrt(v + GN_EPS) * gamma[ch] + beta[ch]
    assert np.abs(out - ref).max() < 1e-12, "group_norm disagrees with its definition"

    # The embedding at t = 0 is [0]*half + [1]*half.
    e = sinusoidal_embedding(np.array([0]), 8)
    assert np.array_equal(e, np.array([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=np.float64))


# ---------------------------------------------------------------- safetensors by hand

DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i4"): "I32"}
DTYPE_RANK = {"I32": 0, "F32": 1}  # the reference writer's enum order; larger first


def write_safetensors(path, tensors, metadata=None):
    items = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        items.append((name, DTYPES[a.dtype.newbyteorder("<")], a.astype(a.dtype.newbyteorder("<"))))
    items.sort(key=lambda it: (-DTYPE_RANK[it[1]], it[0]))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, a in items:
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, a in items:
            f.write(a.tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------- fixtures


def make_fixture(path, in_ch, seed):
    rng = np.random.default_rng(seed)
    base, time_dim = 8, 32
    p32 = init_params(rng, in_ch, base, time_dim)
    x_nhwc = rng.uniform(-1.0, 1.0, (2, 32, 32, in_ch)).astype(np.float32)
    t = np.array([0, 637], dtype=np.int32)
    p = {k: v.astype(np.float64) for k, v in p32.items()}
    eps_nchw = unet_forward(p, x_nhwc.astype(np.float64).transpose(0, 3, 1, 2), t)
    eps = eps_nchw.transpose(0, 2, 3, 1).astype(np.float32)
    tensors = dict(p32)
    tensors.update({"fixture.x": x_nhwc, "fixture.t": t, "fixture.eps": eps})
    write_safetensors(path, tensors, {"format": "pt"})
    print(f"{path}: {len(p32)} parameters, {sum(v.size for v in p32.values())} values, "
          f"eps std {eps.std():.4f}, |eps| max {np.abs(eps).max():.4f}")


def main():
    check_pieces(np.random.default_rng(1234))
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.normpath(os.path.join(here, "..", "fixtures"))
    os.makedirs(out, exist_ok=True)
    make_fixture(os.path.join(out, "unet_base8.safetensors"), 1, 20240601)
    make_fixture(os.path.join(out, "unet_base8_rgb.safetensors"), 3, 20240602)
    return 0


if __name__ == "__main__":
    sys.exit(main())
