/**
 * `/mesh/bench/1`: the plain libp2p stream (tcp + noise + yamux) as a throughput baseline for the
 * overlay link, between the same two members (`mesh bench --over libp2p`).
 *
 * Wire: the sender writes a u64 byte count, then that many bytes; the receiver answers one byte once
 * it has counted them all. The count is capped (MAX_STREAM_BENCH_BYTES) so a member cannot make us
 * wait on a stream forever for more than it announced.
 */
import type { Stream } from '@libp2p/interface'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError, throwIfAborted } from '../../src/base/errors.ts'
import { DiagError } from './diag.ts'

export const STREAM_BENCH_PROTOCOL = '/mesh/bench/1'
export const MAX_STREAM_BENCH_BYTES = 16 * 2 ** 30
const BLOCK = 64 * 1024

export interface StreamBenchResult {
  bytes: number
  seconds: number
  mbps: number
}

function waitDrain(stream: Stream, signal?: AbortSignal): Promise<void> {
  if (!stream.writableNeedsDrain) return Promise.resolve()
  return new Promise<void>((resolve, reject) => {
    const done = () => {
      stream.removeEventListener('drain', onDrain)
      stream.removeEventListener('close', onClose)
      offAbort()
    }
    const onDrain = () => {
      done()
      resolve()
    }
    const onClose = () => {
      done()
      reject(new DiagError('bench stream closed', { code: 'E_BENCH_CLOSED' }))
    }
    const abortNow = () => {
      done()
      reject(new AbortError(undefined, { cause: signal?.reason }))
    }
    stream.addEventListener('drain', onDrain)
    stream.addEventListener('close', onClose)
    const offAbort = onAbort(signal, abortNow)
  })
}

/** Sender side: pushes `bytes` and resolves when the receiver confirmed it counted them all. */
export async function sendStreamBench(
  stream: Stream,
  bytes: number,
  signal?: AbortSignal,
): Promise<StreamBenchResult> {
  if (!Number.isSafeInteger(bytes) || bytes < 1 || bytes > MAX_STREAM_BENCH_BYTES)
    throw new DiagError(`bench size must be 1..${MAX_STREAM_BENCH_BYTES} bytes`, { code: 'E_USAGE' })
  const ack = new Promise<void>((resolve, reject) => {
    stream.addEventListener('message', () => resolve(), { once: true })
    stream.addEventListener(
      'close',
      () => reject(new DiagError('peer closed before confirming', { code: 'E_BENCH_CLOSED' })),
      {
        once: true,
      },
    )
  })
  ack.catch(() => {}) // awaited below; a close while still sending must not be unhandled meanwhile
  const header = new Uint8Array(8)
  new DataView(header.buffer).setBigUint64(0, BigInt(bytes))
  const block = new Uint8Array(BLOCK).fill(0x5a)
  const t0 = performance.now()
  stream.send(header)
  let sent = 0
  while (sent < bytes) {
    throwIfAborted(signal)
    const n = Math.min(BLOCK, bytes - sent)
    sent += n
    if (!stream.send(n === BLOCK ? block : block.subarray(0, n))) await waitDrain(stream, signal)
  }
  await ack
  const seconds = (performance.now() - t0) / 1000
  await stream.close().catch(() => stream.abort(new Error('close failed')))
  return { bytes, seconds, mbps: bytes / 1e6 / seconds }
}

/** Receiver side (the protocol handler). */
export function receiveStreamBench(stream: Stream): void {
  let want: number | undefined
  let header = new Uint8Array(0)
  let got = 0
  stream.addEventListener('message', (evt) => {
    const data = evt.data.subarray()
    let body = data
    if (want === undefined) {
      const merged = new Uint8Array(header.byteLength + data.byteLength)
      merged.set(header)
      merged.set(data, header.byteLength)
      if (merged.byteLength < 8) {
        header = merged
        return
      }
      const n = new DataView(merged.buffer).getBigUint64(0)
      if (n < 1n || n > BigInt(MAX_STREAM_BENCH_BYTES)) {
        stream.abort(new DiagError(`bench of ${n} bytes refused`, { code: 'E_BENCH_SIZE' }))
        return
      }
      want = Number(n)
      body = merged.subarray(8)
    }
    got += body.byteLength
    if (got > want) stream.abort(new DiagError('peer sent more than it announced', { code: 'E_BENCH_SIZE' }))
    else if (got === want) stream.send(new Uint8Array([1]))
  })
}
