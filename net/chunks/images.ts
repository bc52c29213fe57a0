import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises'
import { basename, join, resolve } from 'node:path'
import { throwIfAborted } from '../../src/base/errors.ts'
import { writeFileDurable } from '../../src/base/fs.ts'
import { ChunkError, ImageNotFoundError } from './errors.ts'
import type { ChunkService, FetchProgress } from './exchange.ts'
import type { ChunkStore } from './interfaces.ts'
import { buildManifest } from './manifest.ts'
import { MAX_IMAGE_RECORD } from './v1/messages.ts'

/**
 * Images: a named, tagged list of files (kernel, initrd, disk), each a manifest in the chunk store.
 * Records live in `DIR/images/<name:tag>.json` and every file's manifest is pinned under
 * `image/<name>:<tag>/<file>`, so gc keeps their chunks. Members answer "who has NAME:TAG" over the
 * chunk protocol (ChunkService `images.lookup`), so a pull needs nothing but the overlay.
 */
export class ImageError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_IMAGE', exitCode: 2 })
  }
}

export interface ImageFile {
  /** Base name inside the image (the file name the pull writes). */
  name: string
  /** Manifest id (hex SHA-256 of the encoded manifest). */
  manifest: string
  size: number
}

export interface ImageRecord {
  v: 1
  name: string
  tag: string
  files: ImageFile[]
  created: string
}

export interface ImageRef {
  name: string
  tag: string
}

// Same alphabet as vm/spec.ts `image:NAME[:TAG]` references.
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$/
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/
const FILE_RE = /^[A-Za-z0-9._-]{1,255}$/

/** `NAME[:TAG]` (tag defaults to `latest`). */
export function parseImageRef(ref: string): ImageRef {
  const at = ref.lastIndexOf(':')
  const name = at < 0 ? ref : ref.slice(0, at)
  const tag = at < 0 ? 'latest' : ref.slice(at + 1)
  if (!NAME_RE.test(name) || name.includes('..'))
    throw new ImageError(`invalid image name '${name}': letters, digits, '.', '_', '-', '/'`)
  if (!TAG_RE.test(tag)) throw new ImageError(`invalid image tag '${tag}'`)
  return { name, tag }
}

export function formatImageRef(r: ImageRef): string {
  return `${r.name}:${r.tag}`
}

export function encodeImageRecord(r: ImageRecord): Uint8Array {
  return Buffer.from(JSON.stringify(r))
}

/** Parses a record from a peer: bounded size, every field checked (file names cannot escape a dir). */
export function decodeImageRecord(bytes: Uint8Array): ImageRecord {
  if (bytes.byteLength > MAX_IMAGE_RECORD) throw new ImageError('image record too large')
  let v: unknown
  try {
    v = JSON.parse(Buffer.from(bytes).toString('utf8'))
  } catch (err) {
    throw new ImageError('image record is not JSON', { cause: err })
  }
  const o = v as Partial<ImageRecord>
  if (o === null || typeof o !== 'object' || o.v !== 1) throw new ImageError('unknown image record version')
  if (typeof o.name !== 'string' || typeof o.tag !== 'string')
    throw new ImageError('image record lacks name/tag')
  parseImageRef(`${o.name}:${o.tag}`)
  if (!Array.isArray(o.files) || o.files.length === 0 || o.files.length > 64)
    throw new ImageError('image record must list 1–64 files')
  const seen = new Set<string>()
  const files: ImageFile[] = o.files.map((f: Partial<ImageFile>) => {
    if (
      typeof f?.name !== 'string' ||
      !FILE_RE.test(f.name) ||
      f.name === '.' ||
      f.name === '..' ||
      typeof f.manifest !== 'string' ||
      !/^[0-9a-f]{64}$/.test(f.manifest) ||
      typeof f.size !== 'number' ||
      !Number.isSafeInteger(f.size) ||
      f.size < 0
    )
      throw new ImageError('image record has an invalid file entry')
    if (seen.has(f.name)) throw new ImageError(`image record lists '${f.name}' twice`)
    seen.add(f.name)
    return { name: f.name, manifest: f.manifest, size: f.size }
  })
  return { v: 1, name: o.name, tag: o.tag, files, created: typeof o.created === 'string' ? o.created : '' }
}

/** Progress of a push or pull, in the generic shape src/progress.ts renders. */
export interface ImageProgress {
  phase: 'hash' | 'query' | 'manifests' | 'fetch' | 'assemble' | 'done'
  doneBytes: number
  totalBytes: number
  file?: string
  bytesFetched?: number
  bytesSkipped?: number
  chunksSkipped?: number
  chunksFetched?: number
  rateBps?: number
}

export interface ImageRegistry {
  push(
    files: string[],
    ref: string,
    opts?: { signal?: AbortSignal; onProgress?: (p: ImageProgress) => void },
  ): Promise<ImageRecord>
  list(): ImageRecord[]
  get(ref: string): ImageRecord | undefined
  remove(ref: string): Promise<boolean>
  /**
   * A local file for one file of a held image (what a VM spec's `image:NAME[:TAG]` resolves to):
   * assembled from the store into `dir/NAME/TAG/FILE` once, reused while its manifest is unchanged.
   * `file` may be omitted when the image has a single file. Needs every chunk locally (pull first).
   */
  materialize(
    ref: string,
    opts: { service: ChunkService; dir: string; file?: string; signal?: AbortSignal },
  ): Promise<string>
  /** For ChunkService `images`: the encoded record, if held locally. */
  lookup(ref: string): Uint8Array | undefined
  pull(
    service: ChunkService,
    ref: string,
    /** Where to write the files (default: only into the chunk store). */
    dir: string | undefined,
    opts?: { signal?: AbortSignal; onProgress?: (p: ImageProgress) => void; peers?: string[] },
  ): Promise<{
    record: ImageRecord
    bytesFetched: number
    bytesSkipped: number
    elapsedMs: number
    /** Members that hold the record. */
    from: string[]
    /** Chunk bytes accepted from each member (verified), by PeerId. */
    bytesFromPeer: Record<string, number>
    /** Members whose chunks did not match their names: rejected, and not asked again. */
    badPeers: string[]
    /** Chunks re-requested from other holders after their first holder died or forged. */
    chunksRequeued: number
  }>
}

export async function openImageRegistry(opts: { store: ChunkStore; dir?: string }): Promise<ImageRegistry> {
  const dir = opts.dir ?? join(opts.store.dir, 'images')
  await mkdir(dir, { recursive: true })
  const records = new Map<string, ImageRecord>()
  for (const f of await readdir(dir)) {
    if (!f.endsWith('.json')) continue
    try {
      const r = decodeImageRecord(await readFile(join(dir, f)))
      records.set(formatImageRef(r), r)
    } catch {
      // A damaged record is ignored (its manifests stay pinned until removed by hand).
    }
  }
  const store = opts.store
  const pinName = (r: ImageRef, file: string) => `image/${formatImageRef(r)}/${file}`
  const recordPath = (key: string) => join(dir, `${encodeURIComponent(key)}.json`)

  async function save(r: ImageRecord): Promise<void> {
    const key = formatImageRef(r)
    const old = records.get(key)
    for (const f of r.files) await store.pin(pinName(r, f.name), f.manifest)
    await writeFileDurable(recordPath(key), encodeImageRecord(r), { mode: 0o644 })
    records.set(key, r)
    for (const f of old?.files ?? []) {
      if (!r.files.some((n) => n.name === f.name)) await store.unpin(pinName(r, f.name))
    }
  }

  return {
    async push(files, refStr, o = {}) {
      const ref = parseImageRef(refStr)
      if (files.length === 0) throw new ImageError('an image needs at least one file')
      const names = files.map((f) => basename(f))
      const dup = names.find((n, i) => names.indexOf(n) !== i)
      if (dup !== undefined)
        throw new ImageError(`two files are named '${dup}'; an image holds files by base name`)
      for (const n of names)
        if (!FILE_RE.test(n)) throw new ImageError(`file name '${n}' is not allowed in an image`)
      const sizes = await Promise.all(files.map(async (f) => (await stat(f)).size))
      const total = sizes.reduce((a, b) => a + b, 0)
      let before = 0
      const entries: ImageFile[] = []
      const t0 = performance.now()
      for (const [i, f] of files.entries()) {
        throwIfAborted(o.signal)
        const built = await buildManifest(resolve(f), {
          store,
          pin: pinName(ref, names[i]!),
          signal: o.signal,
          onProgress: (p) =>
            o.onProgress?.({
              phase: 'hash',
              file: names[i]!,
              doneBytes: before + p.bytesDone,
              totalBytes: total,
              rateBps: ((before + p.bytesDone) * 1000) / Math.max(1, performance.now() - t0),
            }),
        })
        entries.push({ name: names[i]!, manifest: built.id, size: sizes[i]! })
        before += sizes[i]!
      }
      const record: ImageRecord = { v: 1, ...ref, files: entries, created: new Date().toISOString() }
      await save(record)
      o.onProgress?.({ phase: 'done', doneBytes: total, totalBytes: total })
      return record
    },

    list() {
      return [...records.values()].sort((a, b) => formatImageRef(a).localeCompare(formatImageRef(b)))
    },

    get(refStr) {
      return records.get(formatImageRef(parseImageRef(refStr)))
    },

    async remove(refStr) {
      const key = formatImageRef(parseImageRef(refStr))
      const r = records.get(key)
      if (r === undefined) return false
      for (const f of r.files) await store.unpin(pinName(r, f.name))
      records.delete(key)
      await rm(recordPath(key), { force: true })
      return true
    },

    async materialize(refStr, mo) {
      const ref = parseImageRef(refStr)
      const key = formatImageRef(ref)
      const r = records.get(key)
      if (r === undefined) throw new ImageNotFoundError(`image ${key} is not held here; pull it first`)
      const f =
        mo.file === undefined
          ? r.files.length === 1
            ? r.files[0]
            : undefined
          : r.files.find((x) => x.name === mo.file)
      if (f === undefined)
        throw new ImageError(
          `image ${key} has files ${r.files.map((x) => x.name).join(', ')}; say which one${mo.file ? ` ('${mo.file}' is not among them)` : ''}`,
        )
      const outDir = join(resolve(mo.dir), ...ref.name.split('/'), ref.tag)
      const path = join(outDir, f.name)
      const stamp = `${path}.manifest`
      try {
        if ((await readFile(stamp, 'utf8')).trim() === f.manifest && (await stat(path)).size === f.size)
          return path
      } catch {
        // not assembled yet
      }
      await mkdir(outDir, { recursive: true })
      const m = await store.getManifest(f.manifest)
      // No peers: everything must come from the local store (the fetch fails if a chunk is missing).
      await mo.service.fetch(m, { file: path, peers: [], signal: mo.signal })
      await writeFile(stamp, f.manifest)
      return path
    },

    lookup(refStr) {
      try {
        const r = records.get(formatImageRef(parseImageRef(refStr)))
        return r === undefined ? undefined : encodeImageRecord(r)
      } catch {
        return undefined
      }
    },

    async pull(service, refStr, target, o = {}) {
      const ref = parseImageRef(refStr)
      const key = formatImageRef(ref)
      const t0 = performance.now()
      o.onProgress?.({ phase: 'query', doneBytes: 0, totalBytes: 0 })
      const answers = await service.queryImage(key, { peers: o.peers, signal: o.signal })
      // Members may disagree (a tag re-pushed on one): take the record most of them hold.
      const votes = new Map<string, { record: ImageRecord; peers: string[] }>()
      for (const a of answers) {
        try {
          const r = decodeImageRecord(a.record)
          if (formatImageRef(r) !== key) continue
          const k = Buffer.from(a.record).toString('base64')
          const v = votes.get(k) ?? { record: r, peers: [] }
          v.peers.push(a.peer)
          votes.set(k, v)
        } catch {
          // A malformed answer counts for nothing.
        }
      }
      const best = [...votes.values()].sort((a, b) => b.peers.length - a.peers.length)[0]
      if (best === undefined) {
        throw new ImageNotFoundError(
          `no member has image ${key} (asked ${answers.length > 0 ? 'some' : 'no'} peers)`,
        )
      }
      const record = best.record
      const total = record.files.reduce((s, f) => s + f.size, 0)
      o.onProgress?.({ phase: 'manifests', doneBytes: 0, totalBytes: total })
      const manifests = []
      for (const f of record.files) {
        const m = await service.fetchManifest(f.manifest, { peers: best.peers, signal: o.signal })
        if (m.size !== f.size) throw new ImageError(`manifest of ${f.name} does not match the record's size`)
        manifests.push(m)
      }
      // Files are assembled in a staging dir beside the target and moved in only when all are complete.
      const out = target === undefined ? undefined : resolve(target)
      const staging = out === undefined ? undefined : join(out, `.pull-${process.pid}-${Date.now()}`)
      if (staging !== undefined) await mkdir(staging, { recursive: true })
      let fetched = 0
      let skipped = 0
      let chunksSkipped = 0
      let chunksFetched = 0
      let before = 0
      const bytesFromPeer: Record<string, number> = {}
      const badPeers = new Set<string>()
      let chunksRequeued = 0
      try {
        for (const [i, f] of record.files.entries()) {
          const r = await service.fetch(manifests[i]!, {
            ...(staging === undefined ? {} : { file: join(staging, f.name) }),
            pin: pinName(ref, f.name),
            signal: o.signal,
            onProgress: (p: FetchProgress) =>
              o.onProgress?.({
                phase: 'fetch',
                file: f.name,
                doneBytes: before + p.bytesDone,
                totalBytes: total,
                bytesFetched: fetched + p.bytesFetched,
                bytesSkipped: skipped + p.bytesSkippedPresent + p.bytesSkippedZero,
                chunksSkipped: chunksSkipped + p.chunksSkipped,
                chunksFetched: chunksFetched + p.chunksFetched,
                rateBps: p.rateBps,
              }),
          })
          fetched += r.bytesFetched
          for (const [peer, n] of Object.entries(r.bytesFromPeer))
            bytesFromPeer[peer] = (bytesFromPeer[peer] ?? 0) + n
          for (const peer of r.badPeers) badPeers.add(peer)
          chunksRequeued += r.chunksRequeued
          skipped += r.bytesSkippedPresent + r.bytesSkippedZero
          chunksSkipped += r.chunksSkipped
          chunksFetched += r.chunksFetched
          before += f.size
        }
        o.onProgress?.({ phase: 'assemble', doneBytes: total, totalBytes: total })
        if (staging !== undefined && out !== undefined)
          for (const f of record.files) await rename(join(staging, f.name), join(out, f.name))
      } finally {
        if (staging !== undefined) await rm(staging, { recursive: true, force: true })
      }
      await save(record)
      o.onProgress?.({
        phase: 'done',
        doneBytes: total,
        totalBytes: total,
        bytesFetched: fetched,
        bytesSkipped: skipped,
        chunksSkipped,
        chunksFetched,
      })
      return {
        record,
        bytesFetched: fetched,
        bytesSkipped: skipped,
        elapsedMs: performance.now() - t0,
        from: best.peers,
        bytesFromPeer,
        badPeers: [...badPeers],
        chunksRequeued,
      }
    },
  }
}

/** What a control-API handler receives besides its params (shape of src/control's HandlerContext). */
export interface ImageHandlerContext {
  emit(event: unknown): void
  signal: AbortSignal
}

/**
 * The agent's control methods for `mesh image` (register them in the agent's control server):
 *   image.push {files: string[] (absolute paths), ref: "NAME[:TAG]"}  → ImageRecord, events ImageProgress
 *   image.pull {ref: "NAME[:TAG]", dir?: string (absolute)}        → {record, bytesFetched, bytesSkipped,
 *                                                                      elapsedMs, from}, events ImageProgress
 *   image.ls   {}                                                   → {images: ImageRecord[]}
 *   image.rm   {ref}                                                → {removed: boolean}
 */
export function imageControlHandlers(deps: {
  registry: ImageRegistry
  service: ChunkService
}): Record<string, (params: unknown, ctx: ImageHandlerContext) => Promise<unknown>> {
  const obj = (p: unknown): Record<string, unknown> => {
    if (p === null || typeof p !== 'object') throw new ImageError('params must be an object')
    return p as Record<string, unknown>
  }
  const str = (p: Record<string, unknown>, k: string): string => {
    const v = p[k]
    if (typeof v !== 'string' || v.length === 0) throw new ImageError(`'${k}' must be a non-empty string`)
    return v
  }
  return {
    'image.push': async (params, ctx) => {
      const p = obj(params)
      const files = p.files
      if (
        !Array.isArray(files) ||
        files.length === 0 ||
        !files.every((f) => typeof f === 'string' && f.startsWith('/'))
      )
        throw new ImageError("'files' must be a non-empty list of absolute paths")
      return deps.registry.push(files as string[], str(p, 'ref'), {
        signal: ctx.signal,
        onProgress: (e) => ctx.emit(e),
      })
    },
    'image.pull': async (params, ctx) => {
      const p = obj(params)
      const dir = p.dir === undefined ? undefined : str(p, 'dir')
      if (dir !== undefined && !dir.startsWith('/')) throw new ImageError("'dir' must be an absolute path")
      return deps.registry.pull(deps.service, str(p, 'ref'), dir, {
        signal: ctx.signal,
        onProgress: (e) => ctx.emit(e),
      })
    },
    'image.ls': async () => ({ images: deps.registry.list() }),
    'image.rm': async (params) => ({ removed: await deps.registry.remove(str(obj(params), 'ref')) }),
  }
}
