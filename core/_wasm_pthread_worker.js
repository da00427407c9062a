// Hosts one of Emscripten's pthreads for tfjs's threaded-SIMD wasm build,
// in a node:worker_threads Worker (which Deno can unref, so an idle pool
// does not keep the process alive). Emscripten's pthread script is a
// classic web-worker script; seeing Deno's `process` it would take the
// Node.js path and `require` what Deno's ESM workers lack. Here it and the
// module factory run as functions whose `process`, `require` and `global`
// are undefined and whose `self`, `postMessage` and `importScripts` are
// stand-ins on this worker's port, so they take the web-worker path.
// Messages are handled strictly in order. See core/wasm_threads.ts.
import { parentPort } from "node:worker_threads";

const scope = {
  onmessage: null,
  factory: null,
  location: { href: import.meta.url },
};
const post = (message, transfer) => parentPort.postMessage(message, transfer);
const noImport = () => {};
const PARAMS = [
  "process",
  "require",
  "global",
  "self",
  "postMessage",
  "importScripts",
  "startWorker",
];

/** Run classic-script text with the stand-ins, returning `returns` if given. */
function classic(text, returns) {
  const body = returns === undefined ? text : `${text}\nreturn ${returns};`;
  return new Function(...PARAMS, body)(
    undefined,
    undefined,
    undefined,
    scope,
    post,
    noImport,
    (instance) => scope.startWorker(instance),
  );
}

let emscripten = null;

async function handle(data) {
  if (data !== null && typeof data === "object" && "__pthreadScript" in data) {
    const text = await (await fetch(data.__pthreadScript)).text();
    // The script refers to the module factory by its global name.
    classic(
      `var WasmBackendModuleThreadedSimd = (m) => self.factory(m);\n${text}`
        .replace('"use strict";', ""),
    );
    emscripten = scope.onmessage;
    return;
  }
  if (data !== null && typeof data === "object" && data.cmd === "load") {
    const blob = data.urlOrBlob;
    const text = typeof blob === "string"
      ? await (await fetch(blob)).text()
      : await blob.text();
    scope.factory = classic(text, "WasmBackendModuleThreadedSimd");
    emscripten({ data: { ...data, urlOrBlob: "about:blank" } });
    return;
  }
  emscripten({ data });
}

let queue = Promise.resolve();
parentPort?.on("message", (data) => {
  queue = queue.then(() => handle(data));
});
