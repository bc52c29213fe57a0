/**
 * coturn on a test host (one namespace of the clouds fixture): long-term credentials generated per run
 * and only ever written to 0600 files (never argv or logs), no TLS, UDP relay only.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type Host, waitForLine } from './clouds.ts'

export interface Coturn {
  url: string
  username: string
  credential: string
  /** `user:password` in a 0600 file, for `mesh agent --turn-credentials`. */
  credentialsFile: string
  /** Removes its config, database and credentials (the process dies with the topology). */
  cleanup(): void
}

export async function startCoturn(host: Host, opts: { port?: number } = {}): Promise<Coturn> {
  const port = opts.port ?? 3479
  const username = 'meshtest'
  const credential = `p${Math.random().toString(36).slice(2)}${Date.now().toString(36)}`
  const dir = mkdtempSync(join(tmpdir(), 'mesh-turn-'))
  const conf = join(dir, 'turnserver.conf')
  writeFileSync(
    conf,
    [
      `listening-ip=${host.ip}`,
      `relay-ip=${host.ip}`,
      `listening-port=${port}`,
      'min-port=49152',
      'max-port=49500',
      'lt-cred-mech',
      'fingerprint',
      `user=${username}:${credential}`,
      'realm=mesh.test',
      'no-tls',
      'no-dtls',
      'no-cli',
      'no-tcp-relay',
      // An ICE agent also asks to relay to the peer's private host candidates; without this coturn
      // tries, gets ENETUNREACH and drops the whole allocation (werift then loops on 438 Stale Nonce).
      // Denied, it answers 403 and the relay pairs still work. Recommended for any TURN server.
      'denied-peer-ip=10.0.0.0-10.255.255.255',
      'denied-peer-ip=172.16.0.0-172.31.255.255',
      'denied-peer-ip=192.168.0.0-192.168.255.255',
      'no-multicast-peers',
      'log-file=stdout',
      'simple-log',
      `pidfile=${join(dir, 'turnserver.pid')}`,
      `userdb=${join(dir, 'turndb')}`,
      '',
    ].join('\n'),
    { mode: 0o600 },
  )
  const credentialsFile = join(dir, 'turn-credentials')
  writeFileSync(credentialsFile, `${username}:${credential}\n`, { mode: 0o600 })
  const cleanup = () => rmSync(dir, { recursive: true, force: true })
  try {
    const turn = host.spawn('turnserver', ['-c', conf], { cwd: dir })
    await waitForLine(turn, /(Total General servers|IPv4. UDP listener opened|relay)/i, 30_000)
  } catch (err) {
    cleanup()
    throw err
  }
  return { url: `turn:${host.ip}:${port}`, username, credential, credentialsFile, cleanup }
}
