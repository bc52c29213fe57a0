/**
 * The survival client: keeps one TCP connection to a guest's echo service open, writes a counted byte
 * pattern at a steady rate, checks that every byte comes back exactly and in order, and measures the
 * longest gap between two received chunks (the stall a VM move causes). Any reset or mismatch is
 * counted, never hidden.
 *
 * In-process: `await streamEcho({ host, port, durationMs })`. As a program (e.g. inside a test's
 * network namespace): `ip netns exec NS npx tsx test/helpers/stream-client.ts HOST PORT DURATION_MS [CATCH_UP_MS]`
 * prints the result as one JSON line; SIGTERM ends the run early and still prints it.
 */
import { connect } from 'node:net'
import { fileURLToPath } from 'node:url'

export interface StreamEchoOptions {
  host: string
  port: number
  durationMs: number
  /** Bytes written per tick (default 1024) and tick interval (default 10 ms): ~100 KB/s. */
  chunkBytes?: number
  intervalMs?: number
  signal?: AbortSignal
  /** Called once the connection is up. */
  onConnect?: () => void
  /** After the writing time, how long to wait for the echo to catch up (default 10 s). */
  catchUpMs?: number
}

export interface StreamGap {
  /** When the gap ended (Date.now()), to match a stall with the move that caused it. */
  endAt: number
  ms: number
}

export interface StreamEchoResult {
  connected: boolean
  bytesSent: number
  bytesEchoed: number
  /** Echoed bytes that differed from what was sent at that offset (0 expected). */
  mismatches: number
  /** Connection resets / errors (0 expected). */
  resets: number
  errors: string[]
  /** Longest time without receiving anything while data was outstanding, ms. */
  maxGapMs: number
  /** When the longest gap ended, ms since the start. */
  maxGapAtMs: number
  durationMs: number
  /** Gaps > 100 ms while data was outstanding, in order (at most 5000). */
  gaps: StreamGap[]
}

/** Byte i of the stream: a pattern whose period (251, prime) does not line up with chunk sizes. */
const patternByte = (i: number) => (i * 7 + Math.floor(i / 251)) & 0xff

export function streamEcho(o: StreamEchoOptions): Promise<StreamEchoResult> {
  const chunk = o.chunkBytes ?? 1024
  const interval = o.intervalMs ?? 10
  return new Promise((resolve) => {
    const t0 = performance.now()
    const r: StreamEchoResult = {
      connected: false,
      bytesSent: 0,
      bytesEchoed: 0,
      mismatches: 0,
      resets: 0,
      errors: [],
      maxGapMs: 0,
      maxGapAtMs: 0,
      durationMs: 0,
      gaps: [],
    }
    let lastRx = t0
    let writer: NodeJS.Timeout | undefined
    let finished = false
    const sock = connect({ host: o.host, port: o.port })
    sock.setNoDelay(true)
    const finish = () => {
      if (finished) return
      finished = true
      if (writer !== undefined) clearInterval(writer)
      clearTimeout(stopTimer)
      o.signal?.removeEventListener('abort', stop)
      r.durationMs = Math.round(performance.now() - t0)
      sock.destroy()
      resolve(r)
    }
    // After the writing time, wait (bounded) for the echo to catch up, then end.
    const stop = () => {
      if (writer !== undefined) clearInterval(writer)
      writer = undefined
      const deadline = performance.now() + (o.catchUpMs ?? 10_000)
      const check = setInterval(() => {
        if (r.bytesEchoed >= r.bytesSent || performance.now() > deadline || finished) {
          clearInterval(check)
          sock.end()
          finish()
        }
      }, 20)
    }
    const stopTimer = setTimeout(stop, o.durationMs)
    o.signal?.addEventListener('abort', stop, { once: true })
    sock.on('connect', () => {
      r.connected = true
      o.onConnect?.()
      lastRx = performance.now()
      writer = setInterval(() => {
        const buf = Buffer.allocUnsafe(chunk)
        for (let i = 0; i < chunk; i++) buf[i] = patternByte(r.bytesSent + i)
        r.bytesSent += chunk
        sock.write(buf)
      }, interval)
    })
    sock.on('data', (data: Buffer) => {
      const now = performance.now()
      const gap = now - lastRx
      if (gap > r.maxGapMs) {
        r.maxGapMs = Math.round(gap)
        r.maxGapAtMs = Math.round(now - t0)
      }
      if (gap > 100 && r.gaps.length < 5000) r.gaps.push({ endAt: Date.now(), ms: Math.round(gap) })
      lastRx = now
      for (let i = 0; i < data.length; i++) if (data[i] !== patternByte(r.bytesEchoed + i)) r.mismatches++
      r.bytesEchoed += data.length
    })
    sock.on('error', (err: NodeJS.ErrnoException) => {
      r.resets++
      r.errors.push(err.code ?? err.message)
      finish()
    })
    sock.on('close', () => finish())
  })
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  // HOST PORT DURATION_MS [CATCH_UP_MS]: prints `connected` once the connection is up, then the result
  // as one JSON line (SIGTERM ends the run early).
  const [host, port, duration, catchUp] = process.argv.slice(2)
  const ac = new AbortController()
  process.once('SIGTERM', () => ac.abort())
  const res = await streamEcho({
    host: host ?? '127.0.0.1',
    port: Number(port ?? 7),
    durationMs: Number(duration ?? 10_000),
    signal: ac.signal,
    ...(catchUp === undefined ? {} : { catchUpMs: Number(catchUp) }),
    onConnect: () => process.stdout.write('connected\n'),
  })
  process.stdout.write(`${JSON.stringify(res)}\n`)
}
