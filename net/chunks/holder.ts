import { describeError } from '../../src/base/errors.ts'
import { ChannelClosedError } from '../link/errors.ts'
import { ChunkVerifyError } from './errors.ts'
import { toHex } from './hash.ts'
import { encodeManifest } from './manifest.ts'
import type { ExchangeSession, PeerConn } from './session.ts'
import {
  allocBlocks,
  BLOCK_HEADER,
  BLOCKS_OVERHEAD,
  type Block,
  type ChunkMessage,
  encode,
  MANIFEST_SLICE,
  MAX_HASHES,
} from './v1/messages.ts'

/** Chunks read for serving, as ready-to-send BLOCKS messages. */
interface ServeBatch {
  messages: { bytes: Uint8Array; blocks: number; dataBytes: number }[]
  missing: Uint8Array[]
}

/** Chunk bytes read per serving batch: 9 chunks of 64 KiB, i.e. three full BLOCKS messages, read with
 *  one readv when adjacent on disk (they are when the holder imported the file in order). */
const SERVE_BATCH_BYTES = 512 * 1024
/** Batches read ahead of the one being sent (at most ~2.3 MiB per peer being served). */
const SERVE_READ_AHEAD = 4

/** The holder's half of the chunk service: answers what members ask of this one (have, want, cancel,
 *  manifest, image) and streams the wanted chunks back with backpressure. */
export class Holder {
  constructor(private readonly svc: ExchangeSession) {}

  /** Answers as if we held nothing: the requester fails fast instead of waiting for a timeout. */
  refuse(conn: PeerConn, msg: ChunkMessage): void {
    const none = new Uint8Array(0)
    if (msg.type === 'have-query')
      this.svc.trySend(conn, { type: 'have-reply', req: msg.req, have: msg.hashes.map(() => false) })
    else if (msg.type === 'want') this.svc.trySend(conn, { type: 'dont-have', hashes: msg.hashes })
    else if (msg.type === 'manifest-get')
      this.svc.trySend(conn, {
        type: 'manifest-data',
        req: msg.req,
        found: false,
        total: 0,
        offset: 0,
        data: none,
      })
    else if (msg.type === 'image-query')
      this.svc.trySend(conn, { type: 'image-reply', req: msg.req, found: false, record: none })
  }

  serve(conn: PeerConn, msg: ChunkMessage): void {
    switch (msg.type) {
      case 'have-query':
        this.svc.trySend(conn, {
          type: 'have-reply',
          req: msg.req,
          have: msg.hashes.map((h) => this.svc.store.has(h)),
        })
        return
      case 'want': {
        const missing: Uint8Array[] = []
        for (const h of msg.hashes) {
          const hex = toHex(h)
          if (!this.svc.store.has(h)) missing.push(h)
          else if (!conn.queued.has(hex)) {
            conn.queued.add(hex)
            conn.serveQueue.push(hex)
          }
        }
        if (missing.length > 0) this.svc.trySend(conn, { type: 'dont-have', hashes: missing })
        if (!conn.serving) void this.serveLoop(conn)
        return
      }
      case 'cancel':
        for (const h of msg.hashes) conn.queued.delete(toHex(h))
        return
      case 'manifest-get':
        void this.serveManifest(conn, msg.req, toHex(msg.id))
        return
      case 'image-query': {
        const rec = this.svc.lookupImage(msg.ref)
        this.svc.trySend(conn, {
          type: 'image-reply',
          req: msg.req,
          found: rec !== undefined,
          record: rec ?? new Uint8Array(0),
        })
        return
      }
    }
  }

  /**
   * Sends wanted chunks as BLOCKS messages. Chunks are read in batches of about SERVE_BATCH_BYTES straight
   * into the messages (one readv per run of chunks adjacent on disk), and up to SERVE_READ_AHEAD more
   * batches are read while one goes out. After a send() returns false it waits for onDrain() before the
   * next message, so a slow link never makes this side hold more than the channel's high-water mark, one
   * message and SERVE_READ_AHEAD + 1 batches (about 3 MiB).
   */
  private async serveLoop(conn: PeerConn): Promise<void> {
    conn.serving = true
    try {
      // Several batches read ahead: each read is a round trip through libuv's thread pool, and on a
      // busy machine that thread waits for a core; one batch ahead left the holder idle half the time.
      const ahead: Promise<ServeBatch>[] = []
      const fill = () => {
        while (ahead.length < SERVE_READ_AHEAD && conn.serveQueue.length > 0) {
          const p = this.readBatch(conn)
          p.catch(() => {}) // awaited in order below; one failing while we wait on another is not unhandled
          ahead.push(p)
        }
      }
      fill()
      while (ahead.length > 0) {
        const batch: ServeBatch = await ahead.shift()!
        if (conn.closed) return
        fill()
        for (let k = 0; k < batch.missing.length; k += MAX_HASHES)
          this.svc.send(conn, { type: 'dont-have', hashes: batch.missing.slice(k, k + MAX_HASHES) })
        for (const m of batch.messages) {
          this.svc.counters.wireBytesOut += m.bytes.byteLength
          this.svc.counters.blocksServed += m.blocks
          this.svc.counters.bytesServed += m.dataBytes
          const ok = conn.ch.send(m.bytes)
          if (!ok) await conn.ch.onDrain()
          if (conn.closed) return
        }
        fill()
      }
    } catch (err) {
      if (!(err instanceof ChannelClosedError))
        this.svc.log('warn', 'serving chunks failed', { peer: conn.peer, error: describeError(err) })
    } finally {
      conn.serving = false
    }
  }

  /** Takes up to SERVE_BATCH_BYTES of wanted chunks off the queue and reads them into BLOCKS messages. */
  private async readBatch(conn: PeerConn): Promise<ServeBatch> {
    const picked: { hash: Buffer; length: number }[] = []
    const missing: Uint8Array[] = []
    // A whole number of full messages' worth (9 chunks of 64 KiB: three messages of three).
    const perMessage = Math.max(
      1,
      Math.floor((this.svc.maxMessageBytes - BLOCKS_OVERHEAD) / (BLOCK_HEADER + this.svc.store.chunkSize)),
    )
    const maxChunks =
      perMessage * Math.max(1, Math.ceil(SERVE_BATCH_BYTES / (perMessage * this.svc.store.chunkSize)))
    let bytes = 0
    while (conn.serveQueue.length > 0 && bytes < 2 * SERVE_BATCH_BYTES && picked.length < maxChunks) {
      const hex = conn.serveQueue.shift()!
      if (!conn.queued.delete(hex)) continue // cancelled
      const hash = Buffer.from(hex, 'hex')
      const length = this.svc.store.sizeOf(hash)
      if (length === undefined) missing.push(hash)
      else {
        picked.push({ hash, length })
        bytes += length
      }
    }
    const groups: (typeof picked)[] = []
    let size = BLOCKS_OVERHEAD
    for (const p of picked) {
      const len = BLOCK_HEADER + p.length
      const cur = groups[groups.length - 1]
      if (cur === undefined || (cur.length > 0 && size + len > this.svc.maxMessageBytes)) {
        groups.push([p])
        size = BLOCKS_OVERHEAD + len
      } else {
        cur.push(p)
        size += len
      }
    }
    const laid = groups.map((g) => ({ g, ...allocBlocks(g) }))
    const items = laid.flatMap((l) => l.g.map((b, k) => ({ hash: b.hash, target: l.slots[k]! })))
    let errs: (Error | undefined)[]
    try {
      errs = await this.svc.store.readInto(items)
    } catch (err) {
      errs = items.map(() => (err instanceof Error ? err : new Error(String(err))))
    }
    const messages: ServeBatch['messages'] = []
    let at = 0
    for (const l of laid) {
      const good: Block[] = []
      for (const [k, b] of l.g.entries()) {
        const err = errs[at++]
        if (err === undefined) good.push({ hash: b.hash, data: l.slots[k]! })
        else {
          missing.push(b.hash)
          if (err instanceof ChunkVerifyError) this.svc.log('error', err.message, { peer: conn.peer })
        }
      }
      const dataBytes = good.reduce((s, b) => s + b.data.byteLength, 0)
      // Rare (a chunk vanished or failed verification): re-encode the message without it.
      if (good.length === l.g.length) messages.push({ bytes: l.message, blocks: good.length, dataBytes })
      else if (good.length > 0)
        messages.push({ bytes: encode({ type: 'blocks', blocks: good }), blocks: good.length, dataBytes })
    }
    return { messages, missing }
  }

  private async serveManifest(conn: PeerConn, req: number, id: string): Promise<void> {
    try {
      if (!/^[0-9a-f]{64}$/.test(id) || !this.svc.store.hasManifest(id)) {
        this.svc.send(conn, {
          type: 'manifest-data',
          req,
          found: false,
          total: 0,
          offset: 0,
          data: new Uint8Array(0),
        })
        return
      }
      const bytes = encodeManifest(await this.svc.store.getManifest(id))
      for (let off = 0; off === 0 || off < bytes.byteLength; off += MANIFEST_SLICE) {
        const data = bytes.subarray(off, off + MANIFEST_SLICE)
        const ok = this.svc.send(conn, {
          type: 'manifest-data',
          req,
          found: true,
          total: bytes.byteLength,
          offset: off,
          data,
        })
        if (!ok) await conn.ch.onDrain()
      }
    } catch (err) {
      this.svc.log('warn', 'serving a manifest failed', { peer: conn.peer, id, error: describeError(err) })
    }
  }
}
