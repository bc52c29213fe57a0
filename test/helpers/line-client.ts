/**
 * Sends one line to a TCP service and prints the first line it answers (e.g. the guest's memory
 * checker: `check` → `OK …`). Run inside a namespace: `node --import tsx line-client.ts HOST PORT LINE`.
 */
import { connect } from 'node:net'

const [host, port, line, timeout] = process.argv.slice(2)
const sock = connect({ host: host ?? '', port: Number(port) })
let buf = ''
const timer = setTimeout(
  () => {
    process.stderr.write(`no answer from ${host}:${port} within ${timeout ?? 60000} ms\n`)
    process.exit(2)
  },
  Number(timeout ?? 60_000),
)
sock.on('connect', () => sock.write(`${line}\n`))
sock.on('data', (d: Buffer) => {
  buf += d.toString()
  const nl = buf.indexOf('\n')
  if (nl >= 0) {
    process.stdout.write(`${buf.slice(0, nl)}\n`)
    clearTimeout(timer)
    sock.destroy()
  }
})
sock.on('error', (e) => {
  process.stderr.write(`${e.message}\n`)
  process.exit(1)
})
