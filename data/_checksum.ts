/**
 * MD5 / SHA-256 digests for download verification (private).
 *
 * The published MNIST and Fashion-MNIST checksums are MD5s, which Web Crypto
 * does not offer, so both digests come from `node:crypto`.
 *
 * @module
 */
import { createHash } from "node:crypto";

/** The digest algorithm a checksum string implies: 32 hex digits MD5, 64 SHA-256. */
export function checksumAlgorithm(
  checksum: string,
  file: string,
): "md5" | "sha256" {
  if (/^[0-9a-f]{32}$/i.test(checksum)) return "md5";
  if (/^[0-9a-f]{64}$/i.test(checksum)) return "sha256";
  throw new TypeError(
    `Cannot check ${file}: the checksum is not a hex MD5 or SHA-256 digest (got "${checksum}", expected 32 or 64 hex digits)`,
  );
}

/** The hex digest of bytes. */
export function hexDigest(
  bytes: Uint8Array,
  algorithm: "md5" | "sha256",
): string {
  return createHash(algorithm).update(bytes).digest("hex");
}

/** Null when bytes match the checksum, else why not ("checksum mismatch (got md5 ..., expected ...)"). */
export function checksumProblem(
  bytes: Uint8Array,
  checksum: string,
  file: string,
): string | null {
  const algorithm = checksumAlgorithm(checksum, file);
  const got = hexDigest(bytes, algorithm);
  return got === checksum.toLowerCase()
    ? null
    : `checksum mismatch (got ${algorithm} ${got}, expected ${checksum.toLowerCase()})`;
}
