/**
 * Whether a disk chunk is worth deflating, guessed from a sample of its bytes (the way btrfs decides
 * before it compresses an extent): the Shannon entropy of the byte values in 16 spread slices of 256
 * bytes. Deflate level 1 runs at ~40 MB/s on this machine's cores and gains nothing on data that is
 * already compressed or encrypted (or random, like the block checker's), while such data costs the same
 * CPU as a database page that shrinks 3–5×; the sample costs a few µs per 64 KiB chunk.
 *
 * Threshold: a uniformly random 4 KiB sample measures ~7.95 bits per byte; deflate level 1 needs far
 * less than that to save the 10% the sender asks for (PostgreSQL heap pages measure 2–5 bits). A chunk
 * whose bytes look random but repeat at a distance within deflate's window is misjudged and sent plain.
 */
const SLICES = 16
const SLICE = 256
/** Bits per byte at or above which a chunk is sent without trying to deflate it. */
export const INCOMPRESSIBLE_BITS = 7.2

const counts = new Uint32Array(256)

/** Entropy (bits per byte) of a sample of `data`: all of it when it is small. */
export function sampleEntropy(data: Uint8Array): number {
  counts.fill(0)
  let n = 0
  if (data.byteLength <= SLICES * SLICE) {
    for (let i = 0; i < data.byteLength; i++) counts[data[i]!]!++
    n = data.byteLength
  } else {
    const step = Math.floor((data.byteLength - SLICE) / (SLICES - 1))
    for (let s = 0; s < SLICES; s++) {
      const at = s * step
      for (let i = at; i < at + SLICE; i++) counts[data[i]!]!++
    }
    n = SLICES * SLICE
  }
  if (n === 0) return 0
  let h = 0
  for (let v = 0; v < 256; v++) {
    const c = counts[v]!
    if (c === 0) continue
    const p = c / n
    h -= p * Math.log2(p)
  }
  return h
}

export function looksCompressible(data: Uint8Array): boolean {
  return sampleEntropy(data) < INCOMPRESSIBLE_BITS
}
