/**
 * A member agent that FORGES chunks: `node --import tsx test/helpers/forger-agent.ts --state DIR --name NAME`.
 *
 * It is a real member (the state dir of a node that joined with an invite), the very agent `mesh agent`
 * builds (buildAgent), so it links, answers `mesh status/peers/image ...` on its control socket and
 * answers have/image queries honestly. Only its store is wrapped (buildAgent's `wrapChunkStore` part,
 * an injection point, not a test hook): every chunk it READS comes back with one byte flipped, so every
 * block it serves is forged while its own pushes (which only write) stay correct; the hash of every
 * chunk it reads goes to STATE/forged-reads.log. Used by test/system/chunks-e2e.test.ts.
 */
import { appendFileSync, existsSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { ChunkHash, ChunkStore } from '../../net/chunks/interfaces.ts'
import { buildAgent } from '../../src/agent/run.ts'
import { createLogger } from '../../src/base/log.ts'
import { statePaths } from '../../src/config.ts'

function flipped<T extends Uint8Array>(data: T): T {
  if (data.byteLength > 0) data[data.byteLength >> 1]! ^= 0xff
  return data
}

/** The real store, except that every read returns bytes that no longer match their name. */
export function forgingStore(inner: ChunkStore, onRead: (h: ChunkHash) => void = () => {}): ChunkStore {
  return {
    get dir() {
      return inner.dir
    },
    get chunkSize() {
      return inner.chunkSize
    },
    has: (h: ChunkHash) => inner.has(h),
    sizeOf: (h: ChunkHash) => inner.sizeOf(h),
    get: async (h: ChunkHash) => {
      onRead(h)
      return flipped(await inner.get(h))
    },
    readInto: async (items) => {
      for (const it of items) onRead(it.hash)
      const res = await inner.readInto(items)
      items.forEach((it, i) => {
        if (res[i] === undefined) flipped(it.target)
      })
      return res
    },
    put: (d, e) => inner.put(d, e),
    putVerified: (h, d) => inner.putVerified(h, d),
    delete: (h) => inner.delete(h),
    lease: () => inner.lease(),
    putManifest: (m) => inner.putManifest(m),
    getManifest: (id) => inner.getManifest(id),
    hasManifest: (id) => inner.hasManifest(id),
    pin: (n, id) => inner.pin(n, id),
    unpin: (n) => inner.unpin(n),
    pins: () => inner.pins(),
    gc: () => inner.gc(),
    stats: () => inner.stats(),
    close: () => inner.close(),
  }
}

function arg(name: string): string {
  const i = process.argv.indexOf(name)
  const v = i < 0 ? undefined : process.argv[i + 1]
  if (v === undefined) {
    process.stderr.write(`usage: forger-agent.ts --state DIR --name NAME (missing ${name})\n`)
    process.exit(2)
  }
  return v
}

async function main(): Promise<void> {
  const dir = statePaths(arg('--state')).dir
  const name = arg('--name')
  if (!existsSync(join(dir, 'network.json'))) throw new Error(`${dir} is not a member's state (join first)`)
  const log = createLogger()
  // The agent `mesh agent` runs, with one part swapped: its chunk store. Every chunk it reads to serve
  // is named in STATE/forged-reads.log (hex, one per line), so a test can tell which resources' chunks
  // the forger was asked for, whatever was still queued from before.
  const agent = await buildAgent({ state: dir, name }, log, {
    wrapChunkStore: (store) =>
      forgingStore(store, (h) =>
        appendFileSync(join(dir, 'forged-reads.log'), `${Buffer.from(h).toString('hex')}\n`),
      ),
  })
  const stop = () => void agent.stop()
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
  await agent.start()
  log.info('forger: every chunk this member serves has a flipped byte')
  await agent.wait()
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  main().catch((err) => {
    process.stderr.write(`forger agent failed: ${err instanceof Error ? err.message : String(err)}\n`)
    process.exit(1)
  })
}
