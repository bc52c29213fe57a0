/**
 * The destination side of a VM's writable disk (a DestinationStream): writes the source's disk chunks
 * into the incoming VM's disk through QEMU's NBD server (vm/disk/writer.ts), in stream order; answers
 * offers with what it lacks, filling chunks it holds in its chunk store (e.g. from the VM's last stay
 * here) locally. Everything is written and flushed before the session loads the device state (the
 * 'final' message comes after this stream's last data, and handle() resolves only once QEMU acked).
 */
import { rm } from 'node:fs/promises'
import { dirname } from 'node:path'
import { inflateRawSync } from 'node:zlib'
import { describeError } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import type { Vm } from '../driver/interfaces.ts'
import { MigrationDecodeError } from '../migration/errors.ts'
import { faultPoint } from '../migration/fault-points.ts'
import type { RamCache } from '../migration/interfaces.ts'
import type { DestinationContext, DestinationStream } from '../migration/stream.ts'
import type { Message } from '../migration/v1/messages.ts'
import { type PreviousDisk, previousSincePath, previousVolumePath } from './previous.ts'
import {
  DISK_HASH_SIZE,
  decodeDiskMessage,
  encodeDiskMessage,
  FLAG_DEFLATED,
  FLAG_ZERO,
} from './v1/messages.ts'
import type { DiskWriter } from './writer.ts'

export class DiskReceiver implements DestinationStream {
  readonly name = 'disk'
  readonly types = ['disk'] as const
  private writer: DiskWriter | undefined
  private incoming: Vm | undefined
  /** The disk the VM left here on an earlier stay (opened at the first offer), or null: none. */
  private previous: PreviousDisk | null | undefined
  private chunkSize = 0
  private size = 0
  private closed = false
  private wroteData = false
  writtenBytes = 0
  cachedBytes = 0

  constructor(
    /** The incoming VM (started by the session while the first data arrives). */
    private readonly vm: () => Promise<Vm> | undefined,
    private readonly cache: RamCache | undefined,
    private readonly log: Logger,
    /** The move whose arrival the source's disk counts writes since (prepare.diskSince). */
    private readonly diskSince?: string,
  ) {}

  private async open(): Promise<DiskWriter> {
    if (this.writer !== undefined) return this.writer
    if (this.closed) throw new MigrationDecodeError('disk data after the disk was closed')
    const pending = this.vm()
    if (pending === undefined) throw new MigrationDecodeError('disk data before the incoming VM started')
    const vm = await pending
    this.incoming = vm
    const w = vm.diskWriter?.()
    if (w === undefined) throw new MigrationDecodeError(`VM '${vm.spec.name}' has no disk here to write`)
    this.writer = await w
    return this.writer
  }

  private check(index: number, len: number): number {
    if (this.chunkSize === 0) throw new MigrationDecodeError('disk chunks before the disk geometry')
    const offset = index * this.chunkSize
    if (!Number.isInteger(index) || index < 0 || offset + len > this.size || len > this.chunkSize)
      throw new MigrationDecodeError(`disk chunk ${index} (${len} bytes) outside the disk`)
    return offset
  }

  async handle(m: Message, ctx: DestinationContext): Promise<void> {
    if (m.type !== 'disk') return
    const d = decodeDiskMessage(m.body)
    const w = await this.open()
    switch (d.kind) {
      case 'info':
        if (d.size !== w.size)
          throw new MigrationDecodeError(`the source's disk has ${d.size} bytes, the one here ${w.size}`)
        this.size = d.size
        this.chunkSize = d.chunkSize
        // The source offers only what changed since that move if our disk is the one we kept then.
        if (this.diskSince !== undefined) {
          const seeded = this.incoming?.volumeSeed === this.diskSince
          await ctx.conv.send(
            { type: 'disk', sid: ctx.sid, body: encodeDiskMessage({ kind: 'seed', seeded }) },
            ctx.signal,
          )
        }
        return
      case 'offer': {
        const want: number[] = []
        const writes: Promise<void>[] = []
        if (this.previous === undefined)
          this.previous = (await this.incoming?.previousDisk?.(this.chunkSize)) ?? null
        const hashes = d.indices.map((_, i) =>
          d.hashes.subarray(i * DISK_HASH_SIZE, (i + 1) * DISK_HASH_SIZE),
        )
        const fromPrevious = this.previous === null ? [] : await this.previous.fill(hashes)
        for (let i = 0; i < d.indices.length; i++) {
          const idx = d.indices[i]!
          const hash = hashes[i]!
          let filled = false
          const old = fromPrevious[i]
          if (old !== undefined) {
            writes.push(w.write(this.check(idx, old.byteLength), old))
            this.cachedBytes += old.byteLength
            this.writtenBytes += old.byteLength
            filled = true
          } else if (this.cache?.has(hash) === true) {
            try {
              const data = await this.cache.get(hash)
              writes.push(w.write(this.check(idx, data.byteLength), data))
              this.cachedBytes += data.byteLength
              this.writtenBytes += data.byteLength
              filled = true
            } catch (err) {
              if (err instanceof MigrationDecodeError) throw err
              this.log.debug('cached disk chunk unusable', { error: describeError(err) })
            }
          }
          if (!filled) want.push(idx)
        }
        await Promise.all(writes)
        await ctx.conv.send(
          {
            type: 'disk',
            sid: ctx.sid,
            body: encodeDiskMessage({ kind: 'want', batch: d.batch, indices: want }),
          },
          ctx.signal,
        )
        return
      }
      case 'data': {
        const writes: Promise<void>[] = []
        for (const c of d.chunks) {
          let data: Uint8Array
          if ((c.flags & FLAG_ZERO) !== 0)
            data = Buffer.alloc(Math.min(this.chunkSize, this.size - c.index * this.chunkSize))
          else if ((c.flags & FLAG_DEFLATED) !== 0) {
            try {
              data = inflateRawSync(c.data, { maxOutputLength: this.chunkSize })
            } catch (cause) {
              throw new MigrationDecodeError('disk chunk does not inflate', { cause })
            }
          } else data = c.data
          writes.push(w.write(this.check(c.index, data.byteLength), data))
          this.writtenBytes += data.byteLength
        }
        await Promise.all(writes)
        // Fault tests: the destination with part of the disk written into its incoming overlay.
        if (!this.wroteData) {
          this.wroteData = true
          faultPoint('destination:disk-data', this.incoming?.spec.name ?? '')
        }
        return
      }
      case 'want':
      case 'seed':
        throw new MigrationDecodeError(`a disk ${d.kind} from the source`)
    }
  }

  /**
   * Every chunk is written (the source sent 'final'), the guest has not run: from here the disk counts
   * the guest's writes since this move's arrival, so a move back to the host it came from sends only
   * those (vm/disk/tracker.ts markArrival). A disk that cannot count just moves in full next time.
   */
  async beforeLoad(ctx: DestinationContext): Promise<void> {
    const vm = this.incoming
    if (this.writer === undefined || vm === undefined || this.chunkSize === 0) return
    await vm.markDiskArrival?.(ctx.sid, this.chunkSize).catch((err: unknown) => {
      this.log.warn('the disk cannot count writes since its arrival; a move back sends all of it', {
        vm: vm.spec.name,
        error: describeError(err),
      })
    })
  }

  close(): void {
    if (this.closed) return
    this.closed = true
    const w = this.writer
    this.writer = undefined
    void w?.close().catch(() => {})
    const prev = this.previous
    this.previous = null
    void prev?.close().catch(() => {})
    // The VM runs here again: the disk it left here last time has served its purpose.
    const vm = this.incoming
    if (vm?.status() === 'running' && vm.volumePath !== undefined) {
      void rm(previousVolumePath(dirname(vm.volumePath), vm.spec.name), { force: true })
      void rm(previousSincePath(dirname(vm.volumePath), vm.spec.name), { force: true })
    }
  }
}
