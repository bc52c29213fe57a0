import { randomBytes } from 'node:crypto'
import { copyFile, open } from 'node:fs/promises'
import type { Overlay } from '../link/interfaces.ts'
import { toHex } from './hash.ts'
import { decode, encode } from './v1/messages.ts'

/**
 * Helpers for the chunk layer's tests and benchmarks (also usable by cross-host tests): data files
 * with a chosen share of zero chunks, variants sharing most chunks, and a forging peer.
 */

/** Writes `size` bytes: random chunks, with about `zeroFraction` of the chunks left all-zero. */
export async function writeTestFile(
  path: string,
  size: number,
  opts: { chunkSize?: number; zeroFraction?: number } = {},
): Promise<void> {
  const cs = opts.chunkSize ?? 64 * 1024
  const fh = await open(path, 'w')
  try {
    await fh.truncate(size)
    const block = 4 * 1024 * 1024
    for (let off = 0; off < size; off += block) {
      const len = Math.min(block, size - off)
      const buf = randomBytes(len)
      if ((opts.zeroFraction ?? 0) > 0) {
        for (let c = 0; c < len; c += cs) {
          if (Math.random() < opts.zeroFraction!) buf.fill(0, c, Math.min(c + cs, len))
        }
      }
      await fh.write(buf, 0, len, off)
    }
  } finally {
    await fh.close()
  }
}

/** Copies `src` to `dst` and overwrites `fraction` of its chunks (evenly spread) with new random bytes.
 *  Returns the indices changed. */
export async function writeVariant(
  src: string,
  dst: string,
  fraction: number,
  chunkSize = 64 * 1024,
): Promise<number[]> {
  await copyFile(src, dst)
  const fh = await open(dst, 'r+')
  try {
    const size = (await fh.stat()).size
    const count = Math.ceil(size / chunkSize)
    const n = Math.round(count * fraction)
    const changed: number[] = []
    for (let k = 0; k < n; k++) {
      const i = Math.floor((k * count) / n)
      const len = Math.min(chunkSize, size - i * chunkSize)
      await fh.write(randomBytes(len), 0, len, i * chunkSize)
      changed.push(i)
    }
    return changed
  } finally {
    await fh.close()
  }
}

/**
 * A malicious member: claims to hold every chunk and answers every WANT with random bytes under the
 * requested names. Returns a function that stops it. Counts what it forged in `stats.forged`.
 */
export function startForgingPeer(overlay: Overlay): { stop(): void; stats: { forged: number } } {
  const stats = { forged: 0 }
  const offs: (() => void)[] = []
  const attach = (link: ReturnType<Overlay['links']>[number]) => {
    const ch = link.channel('chunks')
    offs.push(
      ch.onMessage((bytes) => {
        const msg = decode(bytes)
        if (msg.type === 'have-query') {
          ch.send(encode({ type: 'have-reply', req: msg.req, have: msg.hashes.map(() => true) }))
        } else if (msg.type === 'want') {
          for (const h of msg.hashes) {
            stats.forged++
            ch.send(encode({ type: 'blocks', blocks: [{ hash: h, data: randomBytes(64 * 1024) }] }))
          }
        }
      }),
    )
  }
  for (const l of overlay.links()) attach(l)
  offs.push(overlay.onLink(attach))
  return {
    stats,
    stop() {
      for (const off of offs) off()
    },
  }
}

/** Hex of a buffer's SHA-256, for comparing files in tests. */
export { toHex }
