/**
 * Register tfjs's gradient functions, which tfjs-core alone leaves out.
 *
 * tfjs-core ships its gradients only as unbundled ES modules with
 * extension-less imports, which Deno cannot load; the `@tensorflow/tfjs`
 * bundle registers all of them on import, into the one global kernel
 * registry every tfjs-core copy shares. Import this module for its effect.
 *
 * @module
 */
import "@tensorflow/tfjs";
