/**
 * The UNet's ResBlock and its output head as single ops with hand-written
 * gradients, to keep few activations alive while training.
 *
 * tfjs keeps every tensor a forward pass creates until the whole gradient
 * has been computed, so a ResBlock composed of ops holds seven activations
 * (two GroupNorm+SiLU outputs, two convolution outputs, the time-embedding
 * sum, the skip and the residual sum). As one op it holds its output and
 * saves the second GroupNorm's input y1: the GroupNorm+SiLU outputs are
 * recomputed from their inputs and statistics in the backward (a few
 * elementwise passes), and the intermediate sums never outlive the op.
 *
 * ```
 * a1 = silu(norm1(x))          (stats m1, r1)
 * y1 = conv1(a1) + b1 + proj   (proj = time_proj(silu(temb)), [N, Cout])
 * a2 = silu(norm2(y1))         (stats m2, r2)
 * out = conv2(a2) + b2 + skip(x)     (skip: 1x1 conv when Cin != Cout, else x)
 * ```
 *
 * @module
 */
import { tf } from "./backend.ts";
import { convBackward, convForward } from "./_conv.ts";
import {
  normActApply,
  normActGrad,
  type NormStats,
  normStats,
} from "./_layers.ts";
import { spatialSum } from "./_reduce.ts";

/** The weights of one ResBlock (TF layouts). */
export interface ResBlockParams {
  norm1: [gamma: tf.Tensor, beta: tf.Tensor];
  conv1: [w: tf.Tensor4D, b: tf.Tensor];
  norm2: [gamma: tf.Tensor, beta: tf.Tensor];
  conv2: [w: tf.Tensor4D, b: tf.Tensor];
  /** The 1x1 skip convolution, when the block changes the channel count. */
  skip?: [w: tf.Tensor4D, b: tf.Tensor];
}

const EPS = 1e-5;

/**
 * A ResBlock as one op: `conv2(silu(norm2(conv1(silu(norm1(x))) + proj))) + skip(x)`.
 *
 * @param x Input `[N, H, W, Cin]`.
 * @param proj The time projection `[N, Cout]`, added after conv1.
 * @param p The block's weights.
 * @param groups GroupNorm's groups.
 * @returns `[N, H, W, Cout]`.
 */
export function resBlock(
  x: tf.Tensor4D,
  proj: tf.Tensor2D,
  p: ResBlockParams,
  groups: number,
): tf.Tensor4D {
  const [n, , , cin] = x.shape;
  const cout = p.conv1[0].shape[3];
  const hasSkip = p.skip !== undefined;
  if (!hasSkip && cin !== cout) {
    throw new TypeError(
      `Cannot apply ResBlock: input channels differ from output channels without a skip convolution (got ${cin}, expected ${cout})`,
    );
  }
  const inputs: tf.Tensor[] = [
    x,
    proj,
    ...p.norm1,
    ...p.conv1,
    ...p.norm2,
    ...p.conv2,
    ...(p.skip ?? []),
  ];
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const [xi, pr, g1, be1, w1, b1, g2, be2, w2, b2, ws, bs] = args.slice(
      0,
      -1,
    ) as tf.Tensor[];
    const x4 = xi as tf.Tensor4D;
    const s1 = normStats(x4, groups, EPS);
    const y1 = tf.add(
      convForward(
        normActApply(x4, g1, be1, s1, true),
        w1 as tf.Tensor4D,
        1,
        1,
        b1,
      ),
      tf.reshape(pr, [n, 1, 1, cout]),
    ) as tf.Tensor4D;
    const s2 = normStats(y1, groups, EPS);
    const main = convForward(
      normActApply(y1, g2, be2, s2, true),
      w2 as tf.Tensor4D,
      1,
      1,
      b2,
    );
    const skip = hasSkip ? convForward(x4, ws as tf.Tensor4D, 1, 0, bs) : x4;
    save([
      x4,
      y1,
      s1.mean,
      s1.r,
      s2.mean,
      s2.r,
      g1,
      be1,
      w1,
      g2,
      be2,
      w2,
      ...(hasSkip ? [ws] : []),
    ]);
    return {
      value: tf.add(main, skip) as tf.Tensor4D,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [xs, y1s, m1, r1, m2, r2, gs1, bes1, ws1, gs2, bes2, ws2, wss] =
          saved;
        const d = dy as tf.Tensor4D;
        const x0 = xs as tf.Tensor4D;
        const y = y1s as tf.Tensor4D;
        const st1: NormStats = {
          mean: m1 as tf.Tensor4D,
          r: r1 as tf.Tensor4D,
        };
        const st2: NormStats = {
          mean: m2 as tf.Tensor4D,
          r: r2 as tf.Tensor4D,
        };
        // conv2 and norm2 (a2 recomputed from y1)
        const [da2, dw2, db2] = convBackward(
          normActApply(y, gs2, bes2, st2, true),
          ws2 as tf.Tensor4D,
          d,
          1,
          1,
          true,
        );
        const [dy1, dg2, dbe2] = normActGrad(
          y,
          gs2,
          bes2,
          st2,
          da2 as tf.Tensor4D,
          groups,
          true,
        );
        const dproj = tf.reshape(spatialSum(dy1), [n, cout]);
        // conv1 and norm1 (a1 recomputed from x)
        const [da1, dw1, db1] = convBackward(
          normActApply(x0, gs1, bes1, st1, true),
          ws1 as tf.Tensor4D,
          dy1,
          1,
          1,
          true,
        );
        const [dxMain, dg1, dbe1] = normActGrad(
          x0,
          gs1,
          bes1,
          st1,
          da1 as tf.Tensor4D,
          groups,
          true,
        );
        // In the order of the op's inputs: x, proj, norm1, conv1, norm2,
        // conv2, then the skip convolution's weight and bias.
        const params = [dproj, dg1, dbe1, dw1, db1, dg2, dbe2, dw2, db2];
        if (!hasSkip) return [tf.add(dxMain, d), ...params];
        const [dxs, dws, dbs] = convBackward(
          x0,
          wss as tf.Tensor4D,
          d,
          1,
          0,
          true,
        );
        return [tf.add(dxMain, dxs), ...params, dws, dbs];
      },
    };
  });
  return op(...inputs) as tf.Tensor4D;
}

/**
 * The output head as one op: `conv(silu(norm(x)))` (3x3, padding 1), the
 * activation recomputed in the backward instead of kept.
 *
 * @param x Input `[N, H, W, C]`.
 * @param norm GroupNorm's gamma and beta.
 * @param conv The convolution's kernel `[3, 3, C, Cout]` and bias.
 * @param groups GroupNorm's groups.
 * @returns `[N, H, W, Cout]`.
 */
export function normActConv(
  x: tf.Tensor4D,
  norm: [gamma: tf.Tensor, beta: tf.Tensor],
  conv: [w: tf.Tensor4D, b: tf.Tensor],
  groups: number,
): tf.Tensor4D {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const [xi, g, be, w, b] = args.slice(0, -1) as tf.Tensor[];
    const x4 = xi as tf.Tensor4D;
    const st = normStats(x4, groups, EPS);
    save([x4, st.mean, st.r, g, be, w]);
    return {
      value: convForward(
        normActApply(x4, g, be, st, true),
        w as tf.Tensor4D,
        1,
        1,
        b,
      ),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [xs, mean, r, gs, bes, wsv] = saved;
        const stats: NormStats = {
          mean: mean as tf.Tensor4D,
          r: r as tf.Tensor4D,
        };
        const x0 = xs as tf.Tensor4D;
        const [da, dw, db] = convBackward(
          normActApply(x0, gs, bes, stats, true),
          wsv as tf.Tensor4D,
          dy as tf.Tensor4D,
          1,
          1,
          true,
        );
        const [dx, dg, dbe] = normActGrad(
          x0,
          gs,
          bes,
          stats,
          da as tf.Tensor4D,
          groups,
          true,
        );
        return [dx, dg, dbe, dw, db];
      },
    };
  });
  return op(x, ...norm, ...conv) as tf.Tensor4D;
}
