/**
 * Migration protocol, version 1, on the link's reliable ordered 'migrate' channel.
 *
 * Every message: [u8 version=1][u8 type][8 bytes session id][body]. Bulk messages (offer, want, data,
 * state) have binary bodies; control messages a small JSON object (at most MAX_JSON_BYTES), decoded
 * field by field: anything unexpected is a MigrationDecodeError, never a crash or an unbounded buffer.
 *
 * One move (source S, destination D, token T = newest token of the VM + 1):
 *   S→D prepare{spec, token T, ramSize, chunkSize}      D checks membership and that T is newer than any
 *   D→S accept | refuse                                  token it saw for the VM, allocates RAM, starts an
 *                                                         incoming VM in the background
 *   S→D offer{(index, sha256)…}  D→S want{indices}       bulk: D fills chunks it holds from its cache
 *   S→D data{chunks}… round{n}                           bulk data, then pre-copy rounds of dirty chunks
 *   S→D stateref{…}…                                     optional, during pre-copy: a reference copy of
 *                                                         the device state (taken with the guest stopped
 *                                                         for a few ms), so that at the switch…
 *   S pauses; S→D data… state{…}…|zstate final{T}        final delta + device state (zstate: deflated,
 *                                                         XORed with the reference when one was sent)
 *   D→S ready                                            D wrote everything and loaded the state (paused)
 *   S→D commit{T}                                        S will not resume on its own from here
 *   D→S resumed{T}                                       D runs the VM and owns token T; S stops its copy
 * Any failure before S sends commit: S resumes, D discards. After commit, if the link dies, S keeps the
 * VM paused and asks D (query, on any later link) whether it resumed: D never resumes without commit,
 * and once it did, it answers 'running'; so at most one copy ever runs.
 *
 * Post-copy (when pre-copy cannot converge within the pause the user allows): at the switch the source
 * sends owed{bitmap} (the chunks the destination does not hold yet) instead of their bytes, and
 * final{postcopy}. The destination punches those chunks out of its RAM file and has its pager
 * (vm/postcopy) catch the guest's first touch of each; it resumes on commit as usual, then:
 *   D→S pcwant{indices}   chunks the guest touched and waits for (from 'final' on: loading the device
 *                         state may touch them too)
 *   S→D pcdata{chunks}    urgent ones first, then the rest hottest first; zero and literal pages only
 *   D→S pcack{placed}     flow control: the source keeps few background bytes in flight, so an urgent
 *                         chunk never waits behind many
 *   D→S pcdone{…}         every owed chunk is placed: the source may stop its (paused) copy
 *   D→S pcresume{vm, token} owed{…}   after a link cut or a destination agent restart, on a new session:
 *                         the source's lender for that VM and token goes on from what is still owed
 * The source's copy stays paused, never resumed, and is kept until pcdone: it holds memory the running
 * guest still needs (see ARCHITECTURE.md, "Post-copy").
 *
 * Triggering from another member: request{vm, to} to the host running the VM (found by locate), which
 * streams request-event and ends with request-result.
 *
 * Why one file of ~850 lines (#18: files over ~600 lines say why): it is one wire protocol, and the
 * guide wants each protocol in one versioned module: the type table, every message's encoder and its
 * defensive decoder sit side by side so that a change to a message is one place, and the fuzz test
 * (test/unit/migration-messages.test.ts) covers exactly this module. The disk stream's bodies are the
 * one part with their own life and already live apart (vm/disk/v1/messages.ts).
 */
import { createHash } from 'node:crypto'
import { promisify } from 'node:util'
import { deflateRaw, inflateRawSync } from 'node:zlib'
import { type VmSpec, validateVmSpec } from '../../spec.ts'
import { MigrationDecodeError } from '../errors.ts'

const deflateRawAsync = promisify(deflateRaw)

export const MIGRATION_VERSION = 1
export const HEADER_SIZE = 10
export const SID_SIZE = 8
export const HASH_SIZE = 32
/** Control (JSON) bodies above this are refused. */
export const MAX_JSON_BYTES = 16 * 1024
/** Chunks per offer message (36 bytes each: fits the link's 256 KiB message limit). */
export const MAX_OFFER_ENTRIES = 4096
export const MAX_WANT_ENTRIES = 16384
/** Pages per chunk the data encoding supports (chunks up to 128 KiB of 4 KiB pages). */
export const MAX_PAGES_PER_CHUNK = 32
export const MAX_CHUNKS_PER_DATA = 64
/** Chunks an 'owed' bitmap may describe (128 GiB of RAM in 64 KiB chunks: a 256 KiB message). */
export const MAX_OWED_CHUNKS = 2 * 1024 * 1024 - 64 * 8
/** Device state above this is refused (QEMU's is a few hundred KB without RAM). */
export const MAX_STATE_BYTES = 64 * 1024 * 1024
/** The link's message size limit (net/link MAX_MESSAGE_SIZE). */
export const MAX_WIRE_MESSAGE = 256 * 1024
/** One message's payload size the encoders aim below (the link carries up to 256 KiB). */
export const TARGET_MESSAGE_BYTES = 200 * 1024

const TYPES = [
  'prepare',
  'accept',
  'refuse',
  'offer',
  'want',
  'data',
  'round',
  'state',
  'final',
  'ready',
  'commit',
  'resumed',
  'abort',
  'query',
  'query-reply',
  'ping',
  'pong',
  'locate',
  'locate-reply',
  'request',
  'request-event',
  'request-result',
  // A 'data' message whose body is raw-deflated (decoded as 'data'): see encodeDataMessage().
  'zdata',
  'stateref',
  'zstate',
  // A message of the disk stream: its body is vm/disk/v1/messages.ts's encoding (offer/want/data).
  'disk',
  'history',
  'history-reply',
  'owed',
  'pcwant',
  'pcdata',
  'pcack',
  'pcdone',
  'pcresume',
] as const
export type MessageType = Exclude<(typeof TYPES)[number], 'zdata'>
const CODE = Object.fromEntries(TYPES.map((t, i) => [t, i + 1])) as Record<(typeof TYPES)[number], number>
/** Largest inflated 'zdata' body accepted (a batch of raw chunks). */
export const MAX_ZDATA_RAW = 1024 * 1024

/** How one 4 KiB page of a chunk travels. */
export const PAGE_ZERO = 0
/** The page's bytes are in the literal block. */
export const PAGE_LITERAL = 1
/** A copy of another page the destination already holds (index follows in `refs`). */
export const PAGE_REF = 2
/** Unchanged: the destination's page already holds these bytes. */
export const PAGE_KEEP = 3

export interface EncodedChunk {
  index: number
  /** Literal block is raw-deflated. */
  deflated: boolean
  /** One of PAGE_* per page. */
  kinds: Uint8Array
  /** Source page index (in the whole RAM) for each PAGE_REF, in order. */
  refs: number[]
  literal: Uint8Array
}

export interface PrepareBody {
  spec: VmSpec
  token: number
  ramSize: number
  chunkSize: number
  pageSize: number
  deadlineMs?: number
  /** The source may end this move in post-copy: the destination says in 'accept' whether it can. */
  postcopy?: boolean
  /** Image names the spec refers to (the destination resolves them through the chunk layer). */
  images: string[]
  /**
   * The move (session id) whose arrival the VM's writable disk counts writes since: a destination that
   * kept the disk as it was at the end of that move starts from it (vm/disk/previous.ts) and says so
   * in the disk stream ('seed'); the source then sends only what changed since.
   */
  diskSince?: string
}

/** One entry of a VM's token history (ledger.ts TokenEvent), as it travels. */
export interface HistoryEvent {
  at: number
  token: number
  event: string
  peer?: string
  note?: string
}

/** History entries a reply carries at most. */
export const MAX_HISTORY_EVENTS = 32
/**
 * 'lost': this host ran the VM under that token and that copy is gone (see ledger.ts; also a post-copy
 * that could not finish). 'postcopy': it runs here and still lacks memory held by the source, whose
 * copy must stay.
 */
export type QueryState = 'running' | 'absent' | 'discarded' | 'pending' | 'lost' | 'postcopy'

export interface ErrorInfo {
  code: string
  message: string
}

export type Message =
  | ({ type: 'prepare'; sid: string } & PrepareBody)
  /** `postcopy`: this destination can page a post-copy move (its answer to prepare.postcopy). */
  | { type: 'accept'; sid: string; cachedChunks: number; postcopy?: boolean }
  | { type: 'refuse'; sid: string; code: string; reason: string }
  | { type: 'offer'; sid: string; batch: number; indices: number[]; hashes: Uint8Array }
  | { type: 'want'; sid: string; batch: number; indices: number[] }
  | { type: 'data'; sid: string; round: number; chunks: EncodedChunk[] }
  | { type: 'round'; sid: string; round: number; chunks: number; bytes: number }
  | { type: 'state'; sid: string; offset: number; total: number; bytes: Uint8Array }
  | { type: 'stateref'; sid: string; offset: number; total: number; bytes: Uint8Array }
  /** The whole device state in one message: `bytes` is the inflated body (the state itself, or its XOR
   *  with the reference when `xor`), `hash` the SHA-256 of the state (see applyStateDelta). */
  | { type: 'zstate'; sid: string; total: number; xor: boolean; hash: Uint8Array; bytes: Uint8Array }
  /** The disk stream's messages (vm/disk/v1/messages.ts decodes `body`; at most MAX_WIRE_MESSAGE). */
  | { type: 'disk'; sid: string; body: Uint8Array }
  /** `postcopy`: the chunks of the last 'owed' were not sent; the destination pages them in. */
  | { type: 'final'; sid: string; token: number; round: number; pausedAt: number; postcopy?: boolean }
  | { type: 'ready'; sid: string; loadedAt: number }
  | { type: 'commit'; sid: string; token: number }
  | { type: 'resumed'; sid: string; token: number; resumedAt: number }
  | { type: 'abort'; sid: string; code: string; reason: string }
  | { type: 'query'; sid: string; vm: string; token: number }
  | { type: 'query-reply'; sid: string; vm: string; state: QueryState; token: number }
  | { type: 'ping'; sid: string; t0: number }
  | { type: 'pong'; sid: string; t0: number; t1: number }
  | { type: 'locate'; sid: string; vm: string }
  | { type: 'locate-reply'; sid: string; vm: string; here: boolean; token: number }
  | ({ type: 'request'; sid: string; vm: string; to: string } & MoveOptions)
  | { type: 'request-event'; sid: string; event: Record<string, unknown> }
  | { type: 'history'; sid: string; vm: string }
  /** status: the VM's status on that member ('' = none); lost: its record of a lost newest copy. */
  | {
      type: 'history-reply'
      sid: string
      vm: string
      token: number
      status: string
      lost?: { token: number; on: string }
      events: HistoryEvent[]
    }
  | {
      type: 'request-result'
      sid: string
      ok: boolean
      report?: Record<string, unknown>
      error?: ErrorInfo
    }

  /** The chunks (one bit each, of `chunks`) the destination does not hold at the switch. */
  | { type: 'owed'; sid: string; chunks: number; bitmap: Uint8Array }
  | { type: 'pcwant'; sid: string; indices: number[] }
  /** Chunks of zero and literal pages only (no references: the guest runs and changes pages). */
  | { type: 'pcdata'; sid: string; chunks: EncodedChunk[] }
  | { type: 'pcack'; sid: string; placed: number }
  | {
      type: 'pcdone'
      sid: string
      token: number
      /** Owed chunks the guest touched before they arrived, and the longest wait for one, µs. */
      faults: number
      maxWaitUs: number
      zeroFaults: number
    }
  /**
   * The destination, on a new link (or after its agent restarted), takes up an unfinished post-copy
   * of `vm` under `token`; an 'owed' of what it still lacks follows on the same session.
   */
  | { type: 'pcresume'; sid: string; vm: string; token: number }

/** How a move may go, as a member asks for it (the CLI's flags). */
export interface MoveOptions {
  deadlineMs?: number
  /** The longest pause the guest may see (default with a deadline: 1 s). */
  maxPauseMs?: number
  /** With a deadline the estimate says cannot be met: move anyway, as fast as possible. */
  bestEffort?: boolean
  /** 'auto' (default): post-copy only when pre-copy cannot keep the pause bound; or force one. */
  mode?: 'auto' | 'precopy' | 'postcopy'
}

type Body<T extends MessageType> = Omit<Extract<Message, { type: T }>, 'type' | 'sid'>

const SID_RE = /^[0-9a-f]{16}$/

function header(type: MessageType | 'zdata', sid: string, bodyLen: number): Buffer {
  if (!SID_RE.test(sid)) throw new TypeError(`session id must be 16 hex digits, got '${sid}'`)
  const b = Buffer.allocUnsafe(HEADER_SIZE + bodyLen)
  b[0] = MIGRATION_VERSION
  b[1] = CODE[type]
  b.write(sid, 2, 'hex')
  return b
}

function jsonMessage(type: MessageType, sid: string, body: Record<string, unknown>): Uint8Array {
  const json = Buffer.from(JSON.stringify(body))
  if (json.byteLength > MAX_JSON_BYTES)
    throw new RangeError(`${type} body of ${json.byteLength} bytes is too large`)
  const b = header(type, sid, json.byteLength)
  json.copy(b, HEADER_SIZE)
  return b
}

/**
 * A 'disk' message built in place: `b` holds the disk body after HEADER_SIZE free bytes
 * (encodeDiskMessage(body, HEADER_SIZE)); the header goes there. The same bytes as
 * encodeMessage({ type: 'disk', sid, body }), without copying the body.
 */
export function encodeDiskInPlace(sid: string, b: Uint8Array): Uint8Array {
  if (!SID_RE.test(sid)) throw new TypeError(`session id must be 16 hex digits, got '${sid}'`)
  if (b.byteLength < HEADER_SIZE || b.byteLength > MAX_WIRE_MESSAGE)
    throw new RangeError('disk message too large')
  const h = Buffer.from(b.buffer, b.byteOffset, HEADER_SIZE)
  h[0] = MIGRATION_VERSION
  h[1] = CODE.disk
  h.write(sid, 2, 'hex')
  return b
}

/** Encodes any message. Throws TypeError/RangeError for values the decoder would refuse. */
export function encodeMessage(m: Message): Uint8Array {
  switch (m.type) {
    case 'offer': {
      if (m.indices.length > MAX_OFFER_ENTRIES || m.hashes.byteLength !== m.indices.length * HASH_SIZE)
        throw new RangeError('bad offer')
      const b = header('offer', m.sid, 8 + m.indices.length * (4 + HASH_SIZE))
      b.writeUInt32BE(m.batch, HEADER_SIZE)
      b.writeUInt32BE(m.indices.length, HEADER_SIZE + 4)
      let o = HEADER_SIZE + 8
      m.indices.forEach((idx, i) => {
        b.writeUInt32BE(idx, o)
        b.set(m.hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE), o + 4)
        o += 4 + HASH_SIZE
      })
      return b
    }
    case 'want': {
      if (m.indices.length > MAX_WANT_ENTRIES) throw new RangeError('bad want')
      const b = header('want', m.sid, 8 + m.indices.length * 4)
      b.writeUInt32BE(m.batch, HEADER_SIZE)
      b.writeUInt32BE(m.indices.length, HEADER_SIZE + 4)
      m.indices.forEach((idx, i) => {
        b.writeUInt32BE(idx, HEADER_SIZE + 8 + i * 4)
      })
      return b
    }
    case 'data':
    case 'pcdata': {
      if (m.chunks.length > MAX_CHUNKS_PER_DATA) throw new RangeError('too many chunks in one data message')
      let len = 6
      for (const c of m.chunks)
        len += 4 + 1 + 1 + c.kinds.length + c.refs.length * 4 + 4 + c.literal.byteLength
      const b = header(m.type, m.sid, len)
      let o = HEADER_SIZE
      // pcdata: the same body, round 0 (its chunks are placed as they come, in no round).
      b.writeUInt32BE(m.type === 'data' ? m.round : 0, o)
      b.writeUInt16BE(m.chunks.length, o + 4)
      o += 6
      for (const c of m.chunks) {
        if (m.type === 'pcdata' && c.refs.length > 0)
          throw new RangeError('pcdata carries no page references')
        if (c.kinds.length === 0 || c.kinds.length > MAX_PAGES_PER_CHUNK)
          throw new RangeError('bad page count')
        b.writeUInt32BE(c.index, o)
        b[o + 4] = c.deflated ? 1 : 0
        b[o + 5] = c.kinds.length
        b.set(c.kinds, o + 6)
        o += 6 + c.kinds.length
        for (const r of c.refs) {
          b.writeUInt32BE(r, o)
          o += 4
        }
        b.writeUInt32BE(c.literal.byteLength, o)
        b.set(c.literal, o + 4)
        o += 4 + c.literal.byteLength
      }
      return b
    }
    case 'owed': {
      if (!Number.isSafeInteger(m.chunks) || m.chunks < 0 || m.chunks > MAX_OWED_CHUNKS)
        throw new RangeError('bad owed chunk count')
      if (m.bitmap.byteLength !== Math.ceil(m.chunks / 8)) throw new RangeError('owed bitmap size')
      const b = header('owed', m.sid, 4 + m.bitmap.byteLength)
      b.writeUInt32BE(m.chunks, HEADER_SIZE)
      b.set(m.bitmap, HEADER_SIZE + 4)
      return b
    }
    case 'pcwant': {
      if (m.indices.length > MAX_WANT_ENTRIES) throw new RangeError('bad pcwant')
      const b = header('pcwant', m.sid, 4 + m.indices.length * 4)
      b.writeUInt32BE(m.indices.length, HEADER_SIZE)
      m.indices.forEach((idx, i) => {
        b.writeUInt32BE(idx, HEADER_SIZE + 4 + i * 4)
      })
      return b
    }
    case 'zstate':
      throw new TypeError('zstate is encoded by encodeStateDelta()')
    case 'disk': {
      if (m.body.byteLength > MAX_WIRE_MESSAGE - HEADER_SIZE) throw new RangeError('disk message too large')
      const b = header('disk', m.sid, m.body.byteLength)
      b.set(m.body, HEADER_SIZE)
      return b
    }
    case 'state':
    case 'stateref': {
      const b = header(m.type, m.sid, 8 + m.bytes.byteLength)
      b.writeUInt32BE(m.offset, HEADER_SIZE)
      b.writeUInt32BE(m.total, HEADER_SIZE + 4)
      b.set(m.bytes, HEADER_SIZE + 8)
      return b
    }
    default: {
      const { type, sid, ...body } = m
      return jsonMessage(type, sid, body)
    }
  }
}

/** Reads binary bodies with bounds checks that throw MigrationDecodeError. */
class Reader {
  o: number
  constructor(
    readonly b: Buffer,
    start: number,
  ) {
    this.o = start
  }
  need(n: number, what: string): void {
    if (this.o + n > this.b.byteLength) throw new MigrationDecodeError(`truncated message: ${what}`)
  }
  u8(what: string): number {
    this.need(1, what)
    return this.b[this.o++]!
  }
  u16(what: string): number {
    this.need(2, what)
    const v = this.b.readUInt16BE(this.o)
    this.o += 2
    return v
  }
  u32(what: string): number {
    this.need(4, what)
    const v = this.b.readUInt32BE(this.o)
    this.o += 4
    return v
  }
  bytes(n: number, what: string): Uint8Array {
    this.need(n, what)
    // Copy: the network buffer must not be aliased by what we keep.
    const v = Uint8Array.prototype.slice.call(this.b, this.o, this.o + n)
    this.o += n
    return v
  }
  end(type: string): void {
    if (this.o !== this.b.byteLength)
      throw new MigrationDecodeError(`${type}: ${this.b.byteLength - this.o} trailing bytes`)
  }
}

type Obj = Record<string, unknown>

function int(o: Obj, k: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const v = o[k]
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max)
    throw new MigrationDecodeError(`field '${k}' must be an integer in [${min}, ${max}]`)
  return v
}
function optInt(o: Obj, k: string, min = 0, max = Number.MAX_SAFE_INTEGER): number | undefined {
  return o[k] === undefined ? undefined : int(o, k, min, max)
}
function num(o: Obj, k: string): number {
  const v = o[k]
  if (typeof v !== 'number' || !Number.isFinite(v))
    throw new MigrationDecodeError(`field '${k}' must be a number`)
  return v
}
function str(o: Obj, k: string, max = 256): string {
  const v = o[k]
  if (typeof v !== 'string' || v.length > max)
    throw new MigrationDecodeError(`field '${k}' must be a string of at most ${max} characters`)
  return v
}
function bool(o: Obj, k: string): boolean {
  const v = o[k]
  if (typeof v !== 'boolean') throw new MigrationDecodeError(`field '${k}' must be a boolean`)
  return v
}
function obj(o: Obj, k: string): Obj {
  const v = o[k]
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw new MigrationDecodeError(`field '${k}' must be an object`)
  return v as Obj
}

const MAX_TIME = 1e15

function decodeJson(type: MessageType, sid: string, raw: Buffer): Message {
  if (raw.byteLength > MAX_JSON_BYTES) throw new MigrationDecodeError(`${type}: body too large`)
  let parsed: unknown
  try {
    parsed = JSON.parse(raw.toString('utf8'))
  } catch (cause) {
    throw new MigrationDecodeError(`${type}: body is not JSON`, { cause })
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
    throw new MigrationDecodeError(`${type}: body is not an object`)
  const o = parsed as Obj
  switch (type) {
    case 'prepare': {
      let spec: VmSpec
      try {
        spec = validateVmSpec(o.spec)
      } catch (cause) {
        throw new MigrationDecodeError(`prepare: bad spec: ${(cause as Error).message}`, { cause })
      }
      const images = o.images
      if (
        !Array.isArray(images) ||
        images.length > 16 ||
        images.some((i) => typeof i !== 'string' || i.length > 256)
      )
        throw new MigrationDecodeError("field 'images' must be at most 16 short strings")
      const chunkSize = int(o, 'chunkSize', 4096, 128 * 1024)
      const pageSize = int(o, 'pageSize', 4096, 4096)
      if (chunkSize % pageSize !== 0)
        throw new MigrationDecodeError('chunkSize must be a multiple of pageSize')
      const ramSize = int(o, 'ramSize', 1, 2 ** 44)
      if (ramSize !== spec.memoryMiB * 1024 * 1024)
        throw new MigrationDecodeError('ramSize does not match the spec')
      const deadlineMs = optInt(o, 'deadlineMs', 1, 24 * 3600 * 1000)
      const body: PrepareBody = {
        spec,
        token: int(o, 'token', 1),
        ramSize,
        chunkSize,
        pageSize,
        images: images as string[],
      }
      if (deadlineMs !== undefined) body.deadlineMs = deadlineMs
      if (o.postcopy !== undefined) body.postcopy = bool(o, 'postcopy')
      if (o.diskSince !== undefined) {
        const since = str(o, 'diskSince', 16)
        if (!SID_RE.test(since)) throw new MigrationDecodeError("field 'diskSince' must be a session id")
        body.diskSince = since
      }
      return { type, sid, ...body }
    }
    case 'accept': {
      const m: Message = { type, sid, cachedChunks: int(o, 'cachedChunks') }
      if (o.postcopy !== undefined) m.postcopy = bool(o, 'postcopy')
      return m
    }
    case 'refuse':
    case 'abort':
      return { type, sid, code: str(o, 'code', 64), reason: str(o, 'reason', 1024) }
    case 'round':
      return { type, sid, round: int(o, 'round', 0, 1e6), chunks: int(o, 'chunks'), bytes: int(o, 'bytes') }
    case 'final': {
      const m: Message = {
        type,
        sid,
        token: int(o, 'token', 1),
        round: int(o, 'round', 0, 1e6),
        pausedAt: num(o, 'pausedAt'),
      }
      if (o.postcopy !== undefined) m.postcopy = bool(o, 'postcopy')
      return m
    }
    case 'pcack':
      return { type, sid, placed: int(o, 'placed') }
    case 'pcresume':
      return { type, sid, vm: str(o, 'vm', 63), token: int(o, 'token', 1) }
    case 'pcdone':
      return {
        type,
        sid,
        token: int(o, 'token', 1),
        faults: int(o, 'faults'),
        maxWaitUs: int(o, 'maxWaitUs'),
        zeroFaults: int(o, 'zeroFaults'),
      }
    case 'ready':
      return { type, sid, loadedAt: num(o, 'loadedAt') }
    case 'commit':
      return { type, sid, token: int(o, 'token', 1) }
    case 'resumed':
      return { type, sid, token: int(o, 'token', 1), resumedAt: num(o, 'resumedAt') }
    case 'query':
      return { type, sid, vm: str(o, 'vm', 63), token: int(o, 'token') }
    case 'query-reply': {
      const state = str(o, 'state', 16)
      if (!['running', 'absent', 'discarded', 'pending', 'lost', 'postcopy'].includes(state))
        throw new MigrationDecodeError(`query-reply: unknown state '${state}'`)
      return { type, sid, vm: str(o, 'vm', 63), state: state as QueryState, token: int(o, 'token') }
    }
    case 'ping': {
      const t0 = num(o, 't0')
      if (Math.abs(t0) > MAX_TIME) throw new MigrationDecodeError('ping: bad time')
      return { type, sid, t0 }
    }
    case 'pong':
      return { type, sid, t0: num(o, 't0'), t1: num(o, 't1') }
    case 'locate':
      return { type, sid, vm: str(o, 'vm', 63) }
    case 'locate-reply':
      return { type, sid, vm: str(o, 'vm', 63), here: bool(o, 'here'), token: int(o, 'token') }
    case 'request':
      return { type, sid, vm: str(o, 'vm', 63), to: str(o, 'to', 256), ...decodeMoveOptions(o) }
    case 'request-event':
      return { type, sid, event: obj(o, 'event') }
    case 'history':
      return { type, sid, vm: str(o, 'vm', 63) }
    case 'history-reply': {
      const raw = o.events
      if (!Array.isArray(raw) || raw.length > MAX_HISTORY_EVENTS)
        throw new MigrationDecodeError(`field 'events' must be an array of at most ${MAX_HISTORY_EVENTS}`)
      const events = raw.map((e): HistoryEvent => {
        if (typeof e !== 'object' || e === null || Array.isArray(e))
          throw new MigrationDecodeError('history event must be an object')
        const eo = e as Obj
        const h: HistoryEvent = { at: num(eo, 'at'), token: int(eo, 'token'), event: str(eo, 'event', 16) }
        if (eo.peer !== undefined) h.peer = str(eo, 'peer', 256)
        if (eo.note !== undefined) h.note = str(eo, 'note', 256)
        return h
      })
      const m: Message = {
        type,
        sid,
        vm: str(o, 'vm', 63),
        token: int(o, 'token'),
        status: str(o, 'status', 16),
        events,
      }
      if (o.lost !== undefined) {
        const l = obj(o, 'lost')
        m.lost = { token: int(l, 'token'), on: str(l, 'on', 256) }
      }
      return m
    }
    case 'request-result': {
      const m: Message = { type, sid, ok: bool(o, 'ok') }
      if (o.report !== undefined) m.report = obj(o, 'report')
      if (o.error !== undefined) {
        const e = obj(o, 'error')
        m.error = { code: str(e, 'code', 64), message: str(e, 'message', 4096) }
      }
      return m
    }
    default:
      throw new MigrationDecodeError(`${type} has no JSON body`)
  }
}

/** The optional move options of a request (also checked by the control API's migrate params). */
export function decodeMoveOptions(o: Obj): MoveOptions {
  const out: MoveOptions = {}
  const deadlineMs = optInt(o, 'deadlineMs', 1, 24 * 3600 * 1000)
  if (deadlineMs !== undefined) out.deadlineMs = deadlineMs
  const maxPauseMs = optInt(o, 'maxPauseMs', 1, 24 * 3600 * 1000)
  if (maxPauseMs !== undefined) out.maxPauseMs = maxPauseMs
  if (o.bestEffort !== undefined) out.bestEffort = bool(o, 'bestEffort')
  if (o.mode !== undefined) {
    const mode = str(o, 'mode', 16)
    if (mode !== 'auto' && mode !== 'precopy' && mode !== 'postcopy')
      throw new MigrationDecodeError(`field 'mode' must be auto, precopy or postcopy`)
    out.mode = mode
  }
  return out
}

/** Decodes one message; MigrationDecodeError for anything malformed. */
export function decodeMessage(bytes: Uint8Array): Message {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  if (b.byteLength < HEADER_SIZE)
    throw new MigrationDecodeError(`message of ${b.byteLength} bytes is too short`)
  if (b[0] !== MIGRATION_VERSION)
    throw new MigrationDecodeError(`unsupported migration protocol version ${b[0]}`)
  let type = TYPES[b[1]! - 1]
  if (type === undefined) throw new MigrationDecodeError(`unknown message type ${b[1]}`)
  const sid = b.toString('hex', 2, HEADER_SIZE)
  let r = new Reader(b, HEADER_SIZE)
  if (type === 'zdata') {
    const rawLen = r.u32('raw length')
    if (rawLen > MAX_ZDATA_RAW) throw new MigrationDecodeError(`zdata of ${rawLen} bytes is too large`)
    let raw: Buffer
    try {
      raw = inflateRawSync(b.subarray(r.o), { maxOutputLength: Math.max(rawLen, 1) })
    } catch (cause) {
      throw new MigrationDecodeError('zdata does not inflate', { cause })
    }
    if (raw.byteLength !== rawLen) throw new MigrationDecodeError('zdata inflates to the wrong length')
    r = new Reader(raw, 0)
    type = 'data'
  }
  const body = r.b
  switch (type) {
    case 'offer': {
      const batch = r.u32('batch')
      const n = r.u32('count')
      if (n > MAX_OFFER_ENTRIES)
        throw new MigrationDecodeError(`offer of ${n} entries exceeds ${MAX_OFFER_ENTRIES}`)
      r.need(n * (4 + HASH_SIZE), 'offer entries')
      const indices: number[] = []
      const hashes = new Uint8Array(n * HASH_SIZE)
      for (let i = 0; i < n; i++) {
        indices.push(r.u32('index'))
        hashes.set(b.subarray(r.o, r.o + HASH_SIZE), i * HASH_SIZE)
        r.o += HASH_SIZE
      }
      r.end(type)
      return { type, sid, batch, indices, hashes }
    }
    case 'want': {
      const batch = r.u32('batch')
      const n = r.u32('count')
      if (n > MAX_WANT_ENTRIES)
        throw new MigrationDecodeError(`want of ${n} entries exceeds ${MAX_WANT_ENTRIES}`)
      r.need(n * 4, 'want entries')
      const indices: number[] = []
      for (let i = 0; i < n; i++) indices.push(r.u32('index'))
      r.end(type)
      return { type, sid, batch, indices }
    }
    case 'owed': {
      const chunks = r.u32('chunk count')
      if (chunks > MAX_OWED_CHUNKS) throw new MigrationDecodeError(`owed: ${chunks} chunks`)
      const bitmap = r.bytes(Math.ceil(chunks / 8), 'owed bitmap')
      r.end(type)
      return { type, sid, chunks, bitmap }
    }
    case 'pcwant': {
      const n = r.u32('count')
      if (n > MAX_WANT_ENTRIES) throw new MigrationDecodeError(`pcwant of ${n} entries`)
      r.need(n * 4, 'pcwant entries')
      const indices: number[] = []
      for (let i = 0; i < n; i++) indices.push(r.u32('index'))
      r.end(type)
      return { type, sid, indices }
    }
    case 'data':
    case 'pcdata': {
      const round = r.u32('round')
      const n = r.u16('count')
      if (n > MAX_CHUNKS_PER_DATA)
        throw new MigrationDecodeError(`data with ${n} chunks exceeds ${MAX_CHUNKS_PER_DATA}`)
      const chunks: EncodedChunk[] = []
      for (let i = 0; i < n; i++) {
        const index = r.u32('chunk index')
        const flags = r.u8('flags')
        if ((flags & ~1) !== 0) throw new MigrationDecodeError(`data: unknown flags ${flags}`)
        const pages = r.u8('page count')
        if (pages === 0 || pages > MAX_PAGES_PER_CHUNK)
          throw new MigrationDecodeError(`data: bad page count ${pages}`)
        const kinds = r.bytes(pages, 'page kinds')
        let nrefs = 0
        let nlit = 0
        for (const k of kinds) {
          if (k > PAGE_KEEP) throw new MigrationDecodeError(`data: unknown page kind ${k}`)
          if (type === 'pcdata' && k !== PAGE_ZERO && k !== PAGE_LITERAL)
            throw new MigrationDecodeError(`pcdata: page kind ${k} (only zero and literal pages)`)
          if (k === PAGE_REF) nrefs++
          if (k === PAGE_LITERAL) nlit++
        }
        const refs: number[] = []
        for (let j = 0; j < nrefs; j++) refs.push(r.u32('ref'))
        const litLen = r.u32('literal length')
        if (litLen > MAX_PAGES_PER_CHUNK * 4096 + 1024)
          throw new MigrationDecodeError('data: literal block too large')
        if ((flags & 1) === 0 && litLen !== nlit * 4096)
          throw new MigrationDecodeError(`data: literal block of ${litLen} bytes for ${nlit} pages`)
        const literal = r.bytes(litLen, 'literal block')
        chunks.push({ index, deflated: (flags & 1) === 1, kinds, refs, literal })
      }
      r.end(type)
      if (type === 'pcdata') return { type, sid, chunks }
      return { type, sid, round, chunks }
    }
    case 'zstate': {
      const total = r.u32('total')
      if (total === 0 || total > MAX_STATE_BYTES)
        throw new MigrationDecodeError(`zstate: device state of ${total} bytes`)
      const flags = r.u8('flags')
      if ((flags & ~1) !== 0) throw new MigrationDecodeError(`zstate: unknown flags ${flags}`)
      const hash = r.bytes(HASH_SIZE, 'hash')
      let raw: Buffer
      try {
        // Bounded by the announced total: a small message cannot inflate into unbounded memory.
        raw = inflateRawSync(b.subarray(r.o), { maxOutputLength: total })
      } catch (cause) {
        throw new MigrationDecodeError('zstate does not inflate', { cause })
      }
      if (raw.byteLength !== total) throw new MigrationDecodeError('zstate inflates to the wrong length')
      return { type, sid, total, xor: (flags & 1) === 1, hash, bytes: raw }
    }
    case 'state':
    case 'stateref': {
      const offset = r.u32('offset')
      const total = r.u32('total')
      if (total > MAX_STATE_BYTES)
        throw new MigrationDecodeError(`device state of ${total} bytes is too large`)
      const len = b.byteLength - r.o
      if (offset + len > total) throw new MigrationDecodeError('state piece beyond the total')
      return { type, sid, offset, total, bytes: r.bytes(len, 'state bytes') }
    }
    case 'disk': {
      const len = b.byteLength - r.o
      if (len > MAX_WIRE_MESSAGE) throw new MigrationDecodeError(`disk message of ${len} bytes is too large`)
      return { type, sid, body: r.bytes(len, 'disk body') }
    }
    default:
      return decodeJson(type, sid, body.subarray(HEADER_SIZE))
  }
}

/**
 * Encodes a 'data' message, compressed as 'zdata' when that makes it at least 10% smaller. Runs in the
 * thread pool. The result may exceed TARGET_MESSAGE_BYTES only when the caller's batch did.
 */
export async function encodeDataMessage(
  m: Extract<Message, { type: 'data' }>,
  compress: boolean,
): Promise<{ bytes: Uint8Array; compressed: boolean }> {
  const plain = Buffer.from(encodeMessage(m))
  if (!compress || plain.byteLength - HEADER_SIZE > MAX_ZDATA_RAW) return { bytes: plain, compressed: false }
  const z = await deflateRawAsync(plain.subarray(HEADER_SIZE), { level: 1 })
  if (z.byteLength + 4 >= (plain.byteLength - HEADER_SIZE) * 0.9) return { bytes: plain, compressed: false }
  const b = header('zdata', m.sid, 4 + z.byteLength)
  b.writeUInt32BE(plain.byteLength - HEADER_SIZE, HEADER_SIZE)
  z.copy(b, HEADER_SIZE + 4)
  return { bytes: b, compressed: true }
}

/**
 * The device state as one 'zstate' message: raw-deflated, and XORed with `ref` first when given (a
 * reference copy the destination got during pre-copy; QEMU's state is mostly ROM blocks that never
 * change, so the XOR is nearly all zeros). Undefined when it would not fit one message: send 'state'
 * pieces then. Runs in the thread pool.
 */
export async function encodeStateDelta(
  sid: string,
  state: Uint8Array,
  ref?: Uint8Array,
): Promise<Uint8Array | undefined> {
  if (state.byteLength === 0 || state.byteLength > MAX_STATE_BYTES) return undefined
  const body = Buffer.from(state)
  if (ref !== undefined) xorInto(body, ref)
  const z = await deflateRawAsync(body, { level: 1 })
  if (z.byteLength > TARGET_MESSAGE_BYTES) return undefined
  const b = header('zstate', sid, 4 + 1 + HASH_SIZE + z.byteLength)
  b.writeUInt32BE(state.byteLength, HEADER_SIZE)
  b[HEADER_SIZE + 4] = ref === undefined ? 0 : 1
  b.set(createHash('sha256').update(state).digest(), HEADER_SIZE + 5)
  z.copy(b, HEADER_SIZE + 5 + HASH_SIZE)
  return b
}

/**
 * The device state a 'zstate' message carries. MigrationDecodeError when it needs a reference that
 * was not (wholly) received, or when the result does not match the sender's hash (a reference that
 * differs from the sender's: never load a state that is not exactly the one saved).
 */
export function applyStateDelta(m: Extract<Message, { type: 'zstate' }>, ref?: Uint8Array): Buffer {
  const state = Buffer.from(m.bytes)
  if (m.xor) {
    if (ref === undefined) throw new MigrationDecodeError('zstate refers to a reference state never received')
    xorInto(state, ref)
  }
  if (!createHash('sha256').update(state).digest().equals(m.hash))
    throw new MigrationDecodeError('device state does not match its hash (reference state differs?)')
  return state
}

/** `target ^= ref` over the common length (a shorter reference leaves the tail as is). */
function xorInto(target: Buffer, ref: Uint8Array): void {
  const n = Math.min(target.byteLength, ref.byteLength)
  let i = 0
  // Word-wise when both are aligned (a few hundred KB: well under a millisecond while the guest is paused).
  if (target.byteOffset % 4 === 0 && ref.byteOffset % 4 === 0) {
    const q = n >> 2
    const a = new Int32Array(target.buffer, target.byteOffset, q)
    const b = new Int32Array(ref.buffer, ref.byteOffset, q)
    for (let j = 0; j < q; j++) a[j]! ^= b[j]!
    i = q * 4
  }
  for (; i < n; i++) target[i]! ^= ref[i]!
}

/** A fresh random session id. */
export function newSessionId(): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(SID_SIZE))).toString('hex')
}

export type { Body }
