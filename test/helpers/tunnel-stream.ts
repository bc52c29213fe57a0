/**
 * The survival client of the tunnel suites, as a program for a test's network namespace:
 * `ip netns exec NS node --import tsx test/helpers/tunnel-stream.ts HOST PORT DURATION_MS`.
 * Same stream as stream-client.ts (a counted byte pattern at ~100 KB/s through one TCP connection to an
 * echo service, every echoed byte checked in order, resets counted), and it also lists every gap
 * longer than 100 ms with its wall-clock end (ms since the epoch), so a stall can be matched with the
 * migration that caused it. Prints `connected` once the connection is up; SIGTERM ends the run
 * early; the result is printed as one JSON line.
 */
import { connect } from 'node:net'
import { fileURLToPath } from 'node:url'
import type { StreamEchoResult } from './stream-client.ts'

export interface StreamGap {
  /** When the gap ended (Date.now()). */
  endAt: number
  ms: number
}

export interface TunnelStreamResult extends StreamEchoResult {
  /** Gaps > 100 ms while data was outstanding, in order (at most 5000). */
  gaps: StreamGap[]
}

const patternByte = (i: number) => (i * 7 + Math.floor(i / 251)) & 0xff

export function tunnelStream(o: {
  host: string
  port: number
  durationMs: number
  signal?: AbortSignal
  onConnect?: () => void
}): Promise<TunnelStreamResult> {
  const chunk = 1024
  const interval = 10
  return new Promise((resolve) => {
    const t0 = performance.now()
    const r: TunnelStreamResult = {
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
    const stop = () => {
      if (writer !== undefined) clearInterval(writer)
      writer = undefined
      // Generous: on a loaded box the echo can lag the writer by seconds after a move.
      const deadline = performance.now() + 30_000
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
  const [host, port, duration] = process.argv.slice(2)
  const ac = new AbortController()
  process.once('SIGTERM', () => ac.abort())
  const res = await tunnelStream({
    host: host ?? '127.0.0.1',
    port: Number(port ?? 7),
    durationMs: Number(duration ?? 10_000),
    signal: ac.signal,
    onConnect: () => process.stdout.write('connected\n'),
  })
  process.stdout.write(`${JSON.stringify(res)}\n`)
}
