/**
 * The survival client of the tunnel suites, as a program for a test's network namespace:
 * `ip netns exec NS node --import tsx test/helpers/tunnel-stream.ts HOST PORT DURATION_MS`.
 * The stream of stream-client.ts (a counted byte pattern at ~100 KB/s through one TCP connection to an
 * echo service, every echoed byte checked in order, resets counted, every gap over 100 ms listed with
 * its wall-clock end). Prints `connected` once the connection is up; SIGTERM ends the run early; the
 * result is printed as one JSON line. The echo may lag by seconds after a move on a loaded box: it is
 * given 30 s to catch up.
 */
import { streamEcho } from './stream-client.ts'

const [host, port, duration] = process.argv.slice(2)
const ac = new AbortController()
process.once('SIGTERM', () => ac.abort())
const res = await streamEcho({
  host: host ?? '127.0.0.1',
  port: Number(port ?? 7),
  durationMs: Number(duration ?? 10_000),
  signal: ac.signal,
  catchUpMs: 30_000,
  onConnect: () => process.stdout.write('connected\n'),
})
process.stdout.write(`${JSON.stringify(res)}\n`)
