/**
 * The destination side of guest RAM (a DestinationStream): answers offers with what it lacks (filling
 * the rest from its cache of RAM that left this host), and writes 'data' chunks into the incoming VM's
 * RAM file in stream order.
 */
import { forEachLimit } from '../../src/base/concurrency.ts'
import { describeError } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import { MigrationDecodeError } from './errors.ts'
import type { RamCache } from './interfaces.ts'
import { RamWriter } from './ram.ts'
import type { DestinationContext, DestinationStream } from './stream.ts'
import { HASH_SIZE, type Message } from './v1/messages.ts'

/** Cache reads in flight while answering an offer. */
const CACHE_READS = 8

export class RamReceiver implements DestinationStream {
  readonly name = 'ram'
  readonly types = ['offer', 'data'] as const
  private writer: RamWriter | undefined

  constructor(
    path: string,
    ramSize: number,
    chunkSize: number,
    private readonly cache: RamCache | undefined,
    private readonly log: Logger,
  ) {
    this.writer = new RamWriter(path, ramSize, chunkSize)
  }

  get writtenBytes(): number {
    return this.writer?.ramBytes ?? 0
  }

  get cachedBytes(): number {
    return this.writer?.cachedBytes ?? 0
  }

  private get w(): RamWriter {
    if (this.writer === undefined) throw new MigrationDecodeError('RAM data after the RAM file was closed')
    return this.writer
  }

  async handle(m: Message, ctx: DestinationContext): Promise<void> {
    if (m.type === 'offer') {
      const want: number[] = []
      const cached: { idx: number; hash: Uint8Array }[] = []
      for (let i = 0; i < m.indices.length; i++) {
        const idx = m.indices[i]!
        const hash = m.hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE)
        if (this.cache?.has(hash) === true) cached.push({ idx, hash })
        else want.push(idx)
      }
      // Several cache reads in flight: one at a time, each read's trip through the event loop made the
      // fills latency-bound (a standby's 380 MB took ~6 s on a loaded host while the source waited for
      // this answer). Distinct chunks: the order of the fills does not matter, only that all are done
      // before the next message (data that may reference their pages) is applied.
      const cache = this.cache
      if (cache !== undefined)
        await forEachLimit(cached, CACHE_READS, async ({ idx, hash }) => {
          let data: Uint8Array
          try {
            data = await cache.get(hash)
          } catch (err) {
            // Gone or corrupt in the cache: ask the source instead.
            this.log.debug('cached chunk unusable', { error: describeError(err) })
            want.push(idx)
            return
          }
          this.w.fill(idx, data)
        })
      want.sort((a, b) => a - b)
      await ctx.conv.send({ type: 'want', sid: ctx.sid, batch: m.batch, indices: want }, ctx.signal)
    } else if (m.type === 'data') {
      for (const c of m.chunks) this.w.apply(c)
    }
  }

  close(): void {
    this.writer?.close()
    this.writer = undefined
  }
}
