/**
 * Warm standbys: a member that keeps, in its chunk store, a recent copy of a VM's RAM, so that when the
 * VM must leave in a hurry, the migration to that member sends only what changed since the last sync
 * (the destination skips every chunk its store holds: vm/migration's RamCache).
 *
 * The VM's host (the sender) runs one loop per VM with a standby: it hashes the RAM file into a
 * manifest (64 KiB chunks, zero chunks skipped), serves those chunks straight from the RAM file through
 * its chunk service (ramServingStore: every chunk read is verified against its name, so a chunk the guest
 * rewrote meanwhile is simply "not here" and comes with the next sync), and calls the standby
 * ('standby.sync'). The standby pulls the manifest and the chunks it lacks through the ordinary chunk
 * exchange (member-only, hash-verified, over the direct TCP path when there is one), at most at the VM's
 * standby rate, and pins the manifest as `standby/<vm>`. Passes repeat back to back (at least
 * `minIntervalMs` apart); the lag the host reports is the age of the last completed pass and the bytes
 * that differed at the next hash.
 */
import { type FileHandle, open } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { ChunkFetchError, ChunkNotFoundError } from '../../../net/chunks/errors.ts'
import type { ChunkService } from '../../../net/chunks/exchange.ts'
import { HASH_SIZE, hashEquals, isZeroHash, sha256, toHex } from '../../../net/chunks/hash.ts'
import type { ChunkStore, Manifest, ReadItem, StoreLease } from '../../../net/chunks/interfaces.ts'
import { buildManifest, chunkLength, hashAt, makeManifest, manifestId } from '../../../net/chunks/manifest.ts'
import type { StandbyDiskPass, StandbyDiskReader } from '../../../vm/disk/standby.ts'
import { AbortError, describeError, MeshError, UsageError } from '../../base/errors.ts'

export class StandbyError extends MeshError {}

export const STANDBY_PIN = (vm: string) => `standby/${vm}`
/** The standby's copy of the VM's writable disk (chunks a move's DiskReceiver finds in the store). */
export const STANDBY_DISK_PIN = (vm: string) => `standby/${vm}/disk`
export const DEFAULT_STANDBY_RATE = 16 * 1024 * 1024
const CHUNK = 64 * 1024
/** Chunks per pull (each is one fetch: the pacing step). */
const SLICE_CHUNKS = 256
/**
 * Pulls in flight at once. Each fetch spends round trips on its own (the have query, the first want, the
 * drain of its window at the end): one 16 MiB slice after another ran at 58-60 MB/s on an 86 MB/s
 * crosscloud link (bench evacuate, session 10), which is what kept a busy guest's standby 6-8 s behind.
 */
const SLICES_IN_FLIGHT = 3

interface Indexed {
  /** The RAM file (a RAM entry), kept open between passes. */
  path?: string
  fh?: FileHandle
  manifest: Manifest
  id: string
  /** hex → chunk index in the RAM file or on the disk */
  byHex: Map<string, number>
  /** Reads chunk `index` into `target`; resolves with the bytes read. */
  read(index: number, target: Uint8Array): Promise<number>
}

/** Reads a disk chunk for a standby's pull (the open pass of vm/disk/standby.ts). */
export type ChunkReader = (index: number, target: Uint8Array) => Promise<number>

/**
 * The RAM (and, during a pass, the writable disk) of VMs with a standby, indexed by chunk name, for
 * the chunk service to serve.
 */
export interface RamIndex {
  set(vm: string, path: string, manifest: Manifest): Promise<string>
  /** Serves the disk chunks of `manifest` through `read` until dropDisk(vm) (or drop(vm)). */
  setDisk(vm: string, manifest: Manifest, read: ChunkReader): string
  dropDisk(vm: string): void
  drop(vm: string): Promise<void>
  lookup(hex: string): { entry: Indexed; index: number } | undefined
  manifest(id: string): Manifest | undefined
  close(): Promise<void>
}

function indexHashes(manifest: Manifest): Map<string, number> {
  const byHex = new Map<string, number>()
  for (let i = 0; i < manifest.count; i++) {
    const h = hashAt(manifest, i)
    if (!isZeroHash(h)) byHex.set(toHex(h), i)
  }
  return byHex
}

const DISK_KEY = (vm: string) => `${vm}/disk`

export function createRamIndex(): RamIndex {
  /** VM name (RAM) or `<vm>/disk` → entry (VM names have no '/'). */
  const byVm = new Map<string, Indexed>()
  const drop = async (vm: string) => {
    const e = byVm.get(vm)
    byVm.delete(vm)
    byVm.delete(DISK_KEY(vm))
    await e?.fh?.close().catch(() => {})
  }
  return {
    async set(vm, path, manifest) {
      const old = byVm.get(vm)
      const fh = old?.path === path && old.fh !== undefined ? old.fh : await open(path, 'r')
      if (old?.fh !== undefined && old.fh !== fh) await old.fh.close().catch(() => {})
      const id = manifestId(manifest)
      const read = async (index: number, target: Uint8Array) =>
        (await fh.read(target, 0, target.byteLength, index * manifest.chunkSize)).bytesRead
      byVm.set(vm, { path, fh, manifest, id, byHex: indexHashes(manifest), read })
      return id
    },
    setDisk(vm, manifest, read) {
      const id = manifestId(manifest)
      byVm.set(DISK_KEY(vm), { manifest, id, byHex: indexHashes(manifest), read })
      return id
    },
    dropDisk(vm) {
      byVm.delete(DISK_KEY(vm))
    },
    drop,
    lookup(hex) {
      for (const entry of byVm.values()) {
        const index = entry.byHex.get(hex)
        if (index !== undefined) return { entry, index }
      }
      return undefined
    },
    manifest(id) {
      for (const e of byVm.values()) if (e.id === id) return e.manifest
      return undefined
    },
    async close() {
      for (const vm of [...byVm.keys()]) await drop(vm)
    },
  }
}

/**
 * The chunk store the chunk service serves from: the real one, plus the RAM chunks of VMs with a
 * standby, read from the RAM file and verified on every read (a chunk the guest changed since the hash
 * reads as ChunkNotFoundError: the service answers 'dont-have'). Writes and pins go to the real store.
 */
export function ramServingStore(inner: ChunkStore, index: RamIndex): ChunkStore {
  const fromRam = async (item: ReadItem): Promise<Error | undefined> => {
    const hex = toHex(item.hash)
    const at = index.lookup(hex)
    if (at === undefined) return new ChunkNotFoundError(`chunk ${hex} not found`)
    const len = item.target.byteLength
    if (len !== chunkLength(at.entry.manifest, at.index))
      return new ChunkNotFoundError(`chunk ${hex}: bad size`)
    try {
      const bytesRead = await at.entry.read(at.index, item.target)
      if (bytesRead !== len || !hashEquals(sha256(item.target), item.hash))
        return new ChunkNotFoundError(`chunk ${hex} changed in RAM since it was hashed`)
      return undefined
    } catch (err) {
      return new ChunkNotFoundError(`chunk ${hex}: ${describeError(err)}`, { cause: err })
    }
  }
  return {
    get dir() {
      return inner.dir
    },
    get chunkSize() {
      return inner.chunkSize
    },
    has: (hash) => inner.has(hash) || index.lookup(toHex(hash)) !== undefined,
    sizeOf(hash) {
      const n = inner.sizeOf(hash)
      if (n !== undefined) return n
      const at = index.lookup(toHex(hash))
      return at === undefined ? undefined : chunkLength(at.entry.manifest, at.index)
    },
    async readInto(items) {
      const mine: number[] = []
      const theirs: ReadItem[] = []
      const where: number[] = []
      items.forEach((it, i) => {
        if (inner.has(it.hash)) {
          where.push(i)
          theirs.push(it)
        } else mine.push(i)
      })
      const out: (Error | undefined)[] = new Array(items.length).fill(undefined)
      const errs = theirs.length > 0 ? await inner.readInto(theirs) : []
      errs.forEach((e, k) => {
        out[where[k]!] = e
      })
      await Promise.all(
        mine.map(async (i) => {
          out[i] = await fromRam(items[i]!)
        }),
      )
      return out
    },
    async get(hash) {
      if (inner.has(hash)) return inner.get(hash)
      const at = index.lookup(toHex(hash))
      if (at === undefined) return inner.get(hash)
      const buf = Buffer.allocUnsafe(chunkLength(at.entry.manifest, at.index))
      const err = await fromRam({ hash, target: buf })
      if (err !== undefined) throw err
      return buf
    },
    put: (data, expected) => inner.put(data, expected),
    putVerified: (hash, data) => inner.putVerified(hash, data),
    delete: (hash) => inner.delete(hash),
    lease: (): StoreLease => inner.lease(),
    putManifest: (m) => inner.putManifest(m),
    async getManifest(id) {
      return index.manifest(id) ?? inner.getManifest(id)
    },
    hasManifest: (id) => index.manifest(id) !== undefined || inner.hasManifest(id),
    pin: (name, id) => inner.pin(name, id),
    unpin: (name) => inner.unpin(name),
    pins: () => inner.pins(),
    gc: () => inner.gc(),
    stats: () => inner.stats(),
    close: () => inner.close(),
  }
}

export interface SyncParams {
  vm: string
  /** The RAM's manifest. */
  manifest: string
  /** The writable disk's manifest, when the VM has one and this pass read it. */
  disk?: string
  rateBps: number
}

export function parseSyncParams(p: unknown): SyncParams {
  const o = (p ?? {}) as Record<string, unknown>
  if (typeof o.vm !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(o.vm))
    throw new UsageError('standby.sync: vm must be a VM name')
  if (typeof o.manifest !== 'string' || !/^[0-9a-f]{64}$/.test(o.manifest))
    throw new UsageError('standby.sync: manifest must be a manifest id')
  if (o.disk !== undefined && (typeof o.disk !== 'string' || !/^[0-9a-f]{64}$/.test(o.disk)))
    throw new UsageError('standby.sync: disk must be a manifest id')
  const rate = o.rateBps
  if (typeof rate !== 'number' || !Number.isFinite(rate) || rate < 64 * 1024 || rate > 2 ** 40)
    throw new UsageError('standby.sync: rateBps must be at least 64 KiB/s')
  return {
    vm: o.vm,
    manifest: o.manifest,
    ...(o.disk === undefined ? {} : { disk: o.disk as string }),
    rateBps: rate,
  }
}

export interface SyncResult {
  fetchedBytes: number
  /** Non-zero bytes the standby held already. */
  presentBytes: number
  missingChunks: number
  ms: number
  /** Of the above, the disk's (when the pass had one). */
  disk?: { fetchedBytes: number; presentBytes: number; missingChunks: number }
}

/**
 * The standby's side of one pass: pull the manifest and the chunks it lacks from the VM's host, paced
 * to `rateBps`, then pin the manifest. A chunk the host no longer has (the guest rewrote it) is missing
 * from this pass, counted, and comes with the next one.
 */
export async function pullStandby(
  deps: { service: ChunkService; store: ChunkStore; sliceChunks?: number },
  from: string,
  p: SyncParams,
  signal: AbortSignal,
): Promise<SyncResult> {
  const t0 = performance.now()
  let fetched = 0
  const ram = await pullManifest(p.manifest, STANDBY_PIN(p.vm))
  if (p.disk === undefined) return { ...ram, missingChunks: ram.missing, ms: performance.now() - t0 }
  const disk = await pullManifest(p.disk, STANDBY_DISK_PIN(p.vm))
  return {
    fetchedBytes: ram.fetchedBytes + disk.fetchedBytes,
    presentBytes: ram.presentBytes + disk.presentBytes,
    missingChunks: ram.missing + disk.missing,
    ms: performance.now() - t0,
    disk: { fetchedBytes: disk.fetchedBytes, presentBytes: disk.presentBytes, missingChunks: disk.missing },
  }

  /** A slice's non-zero chunks, and how many of them the store holds. */
  function census(hashes: Uint8Array, n: number): { nonZero: number; held: number } {
    let nonZero = 0
    let held = 0
    for (let i = 0; i < n; i++) {
      const h = hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE)
      if (isZeroHash(h)) continue
      nonZero++
      if (deps.store.has(h)) held++
    }
    return { nonZero, held }
  }

  /**
   * One manifest, paced with the pass's other (the rate is the pass's). Up to SLICES_IN_FLIGHT slices are
   * fetched at once; a slice starts only when what was fetched and what is in flight do not run ahead of
   * the rate since the pass began.
   */
  async function pullManifest(id: string, pin: string) {
    const m = await deps.service.fetchManifest(id, { peers: [from], signal })
    const sliceChunks = deps.sliceChunks ?? SLICE_CHUNKS
    const before = fetched
    let present = 0
    let missing = 0
    /** Bytes the slices in flight are expected to fetch (not yet in `fetched`). */
    let committed = 0
    let failure: { err: unknown } | undefined
    const inFlight = new Set<Promise<void>>()
    const pullSlice = async (hashes: Uint8Array, n: number, expect: number) => {
      const slice = makeManifest(n * m.chunkSize, m.chunkSize, hashes)
      const heldBefore = census(hashes, n).held
      try {
        const r = await deps.service.fetch(slice, { peers: [from], signal })
        fetched += r.bytesFetched
        present += r.bytesSkippedPresent
      } catch (err) {
        if (!(err instanceof ChunkFetchError)) throw err
        // The chunks fetched before it gave up are stored; the rest changed on the host meanwhile.
        const k = /(\d+) chunk\(s\)/.exec(err.message)
        missing += k === null ? 1 : Number(k[1])
        const after = census(hashes, n).held
        fetched += Math.max(0, after - heldBefore) * m.chunkSize
        present += heldBefore * m.chunkSize
      } finally {
        committed -= expect
      }
    }
    try {
      for (let first = 0; first < m.count && failure === undefined; first += sliceChunks) {
        if (signal.aborted) throw new AbortError('standby sync aborted', { cause: signal.reason })
        const n = Math.min(sliceChunks, m.count - first)
        const hashes = m.hashes.subarray(first * HASH_SIZE, (first + n) * HASH_SIZE)
        // One pass over the slice: all held → counted as present; otherwise what it lacks is what the
        // fetch is expected to bring (the pacing counts it while in flight).
        const { nonZero, held } = census(hashes, n)
        if (held === nonZero) {
          present += nonZero * m.chunkSize
          continue
        }
        while (inFlight.size >= SLICES_IN_FLIGHT) await Promise.race(inFlight)
        if (failure !== undefined) break
        // Pacing: never above the rate on average since the pass began, counting what is in flight.
        const aheadMs = ((fetched + committed) * 1000) / p.rateBps - (performance.now() - t0)
        if (aheadMs > 5) await sleep(aheadMs, undefined, { signal }).catch(() => {})
        if (signal.aborted) throw new AbortError('standby sync aborted', { cause: signal.reason })
        const expect = (nonZero - held) * m.chunkSize
        committed += expect
        const job: Promise<void> = pullSlice(hashes, n, expect).then(
          () => {
            inFlight.delete(job)
          },
          (err: unknown) => {
            inFlight.delete(job)
            failure ??= { err }
          },
        )
        inFlight.add(job)
      }
    } finally {
      // Every slice settles before the pass ends or fails: nothing is left writing into the store.
      await Promise.all(inFlight)
    }
    if (failure !== undefined) throw failure.err
    // The pass ends no sooner than its bytes at the rate (the next pass's pacing starts from zero).
    const aheadMs = (fetched * 1000) / p.rateBps - (performance.now() - t0)
    if (aheadMs > 5) await sleep(aheadMs, undefined, { signal }).catch(() => {})
    await deps.store.pin(pin, id)
    return { fetchedBytes: fetched - before, presentBytes: present, missing }
  }
}

export interface StandbyStatus {
  vm: string
  /** The member that holds the standby (PeerId and name), once chosen. */
  peer?: string
  peerName?: string
  state: 'choosing' | 'syncing' | 'synced' | 'failed'
  /**
   * Bytes the standby lacked at the last look (the last pass's missing chunks, or what changed since),
   * RAM and disk together.
   */
  lagBytes?: number
  /** The writable disk's part: what the overlay holds, what the standby lacks of it, its write rate. */
  disk?: { heldBytes: number; lagBytes: number; dirtyRateBps?: number; error?: string }
  /** When the RAM the standby holds was hashed (ms since the epoch). */
  syncedAt?: number
  passes: number
  /** Bytes per second of RAM the guest changed between two passes (64 KiB chunks). */
  dirtyRateBps?: number
  lastPass?: { fetchedBytes: number; ms: number; hashMs: number; diskFetchedBytes?: number }
  error?: string
}

/**
 * What a move to the standby must still carry, as far as its status tells at `nowMs`: what the last pass
 * missed (`lagBytes`, RAM and disk) plus what the guest changed since that pass hashed its RAM (its write
 * rate over the time since), at most `capBytes` (the VM's RAM and disk). Right after a pass `lagBytes`
 * alone counts only the missed chunks: a busy guest had rewritten ~200 MB more by the notice.
 */
export function standbyBytesToSend(status: StandbyStatus, nowMs: number, capBytes: number): number {
  const lag = status.lagBytes ?? capBytes
  const sinceMs = status.syncedAt === undefined ? 0 : Math.max(0, nowMs - status.syncedAt)
  const rate = (status.dirtyRateBps ?? 0) + (status.disk?.dirtyRateBps ?? 0)
  return Math.min(capBytes, Math.round(lag + (rate * sinceMs) / 1000))
}

export interface SenderDeps {
  index: RamIndex
  /** Asks the standby to pull; resolves with its result. */
  sync(peer: string, params: SyncParams, signal: AbortSignal): Promise<SyncResult>
  /** Picks (or confirms) the standby member for the VM: PeerId and name, or undefined when none fits. */
  choose(vm: string): Promise<{ peer: string; name: string } | undefined>
  /** The VM's RAM file while it runs here, undefined once it left or stopped. */
  ramPath(vm: string): Promise<string | undefined>
  rateBps(vm: string): number
  /** The VM's writable disk as the standby reads it, undefined when it has none. */
  disk?(vm: string): StandbyDiskReader | undefined
  minIntervalMs?: number
  warn(msg: string, fields?: Record<string, unknown>): void
}

/** The host's loop for one VM; ends when the VM is no longer here or the signal fires. */
export async function runStandbySender(
  vm: string,
  deps: SenderDeps,
  status: StandbyStatus,
  signal: AbortSignal,
): Promise<void> {
  let last: Manifest | undefined
  let missedBytes = 0
  let lastScanAt: number | undefined
  let peer: { peer: string; name: string } | undefined
  let diskReader: StandbyDiskReader | undefined
  let diskMissed = 0
  let diskScanAt: number | undefined
  try {
    diskReader = deps.disk?.(vm)
    while (!signal.aborted) {
      const path = await deps.ramPath(vm)
      if (path === undefined) return
      const t0 = Date.now()
      try {
        if (peer === undefined) {
          status.state = 'choosing'
          peer = await deps.choose(vm)
          if (peer === undefined) throw new StandbyError('no member with room for a standby')
          status.peer = peer.peer
          status.peerName = peer.name
          last = undefined
          diskMissed = 0
        }
        const h0 = performance.now()
        const scanStart = h0
        const { manifest } = await buildManifest(path, { chunkSize: CHUNK, signal })
        const hashMs = performance.now() - h0
        let ramLag: number | undefined
        if (last !== undefined && last.count === manifest.count) {
          let changed = 0
          for (let i = 0; i < manifest.count; i++)
            if (!hashEquals(hashAt(last, i), hashAt(manifest, i)) && !isZeroHash(hashAt(manifest, i)))
              changed++
          // What the standby lacks of this RAM: what changed since its copy, and what the last pass missed.
          ramLag = changed * CHUNK + missedBytes
          status.lagBytes = ramLag + (status.disk?.lagBytes ?? 0)
          // The guest's write rate in 64 KiB chunks (a lower bound: a chunk rewritten twice counts once).
          if (lastScanAt !== undefined && h0 > lastScanAt)
            status.dirtyRateBps = Math.round((changed * CHUNK * 1000) / (h0 - lastScanAt))
        }
        const id = await deps.index.set(vm, path, manifest)
        const disk = diskReader === undefined ? undefined : await diskPass(diskReader)
        if (ramLag !== undefined) status.lagBytes = ramLag + (status.disk?.lagBytes ?? 0)
        if (status.state !== 'synced') status.state = 'syncing'
        let r: SyncResult
        try {
          const diskId = disk === undefined ? undefined : deps.index.setDisk(vm, disk.manifest, disk.read)
          r = await deps.sync(
            peer.peer,
            {
              vm,
              manifest: id,
              ...(diskId === undefined ? {} : { disk: diskId }),
              rateBps: deps.rateBps(vm),
            },
            signal,
          )
        } finally {
          deps.index.dropDisk(vm)
          await disk?.close()
        }
        if (disk !== undefined && status.disk !== undefined) {
          diskMissed = (r.disk?.missingChunks ?? 0) * CHUNK
          status.disk.lagBytes = diskMissed
        }
        last = manifest
        lastScanAt = scanStart
        status.syncedAt = t0
        missedBytes = (r.missingChunks - (r.disk?.missingChunks ?? 0)) * CHUNK
        status.lagBytes = missedBytes + (status.disk?.lagBytes ?? 0)
        status.state = 'synced'
        status.passes++
        status.lastPass = {
          fetchedBytes: r.fetchedBytes,
          ms: Math.round(r.ms),
          hashMs: Math.round(hashMs),
          ...(r.disk === undefined ? {} : { diskFetchedBytes: r.disk.fetchedBytes }),
        }
        delete status.error
      } catch (err) {
        if (err instanceof AbortError || signal.aborted) return
        status.state = 'failed'
        status.error = describeError(err)
        deps.warn('standby sync failed', { vm, peer: peer?.name, error: status.error })
        // Choose again next time (the member may be gone or full); back off a little.
        peer = undefined
        await sleep(5000, undefined, { signal }).catch(() => {})
        continue
      }
      const wait = (deps.minIntervalMs ?? 2000) - (Date.now() - t0)
      if (wait > 0) await sleep(wait, undefined, { signal }).catch(() => {})
    }
  } finally {
    await deps.index.drop(vm)
    await diskReader?.close().catch(() => {})
  }

  /**
   * This pass's disk: the manifest (only what changed since the last pass is read again). Undefined
   * when a move holds the disk, or the disk cannot be read (said in the status; RAM goes on alone).
   */
  async function diskPass(reader: StandbyDiskReader): Promise<StandbyDiskPass | undefined> {
    const at = performance.now()
    try {
      const d = await reader.pass(signal)
      const changed = d.changedBytes ?? d.heldBytes
      const prev = status.disk
      status.disk = {
        heldBytes: d.heldBytes,
        // Before the pull: what changed since the copy the standby holds, and what it missed last time.
        lagBytes: changed + diskMissed,
        ...(d.changedBytes !== undefined && diskScanAt !== undefined && at > diskScanAt
          ? { dirtyRateBps: Math.round((d.changedBytes * 1000) / (at - diskScanAt)) }
          : prev?.dirtyRateBps === undefined
            ? {}
            : { dirtyRateBps: prev.dirtyRateBps }),
      }
      diskScanAt = at
      return d
    } catch (err) {
      if (signal.aborted) throw err
      // A move took the disk (it may roll back: the bitmap kept counting), or the disk failed.
      status.disk = {
        heldBytes: status.disk?.heldBytes ?? 0,
        lagBytes: status.disk?.lagBytes ?? 0,
        ...(err instanceof AbortError ? {} : { error: describeError(err) }),
      }
      if (!(err instanceof AbortError))
        deps.warn('standby disk pass failed', { vm, error: describeError(err) })
      return undefined
    }
  }
}
