/**
 * `npm run demo`: the main job on one machine. Builds an internet and three clouds behind NATs out of
 * network namespaces, starts a bootstrap member (circuit relay + STUN) and coturn on the internet, joins
 * one host per cloud with invites through the `mesh` CLI, and shows the resulting mesh: every pair of
 * members with its link, path type (host/srflx/relay) and RTT, plus a throughput sample. Everything it
 * creates is removed at the end, also on Ctrl-C.
 */

import { missing } from '../../test/helpers/prereq.ts'
import { createTestnet, type PeerRow, type Testnet } from '../../test/helpers/testnet.ts'
import { formatTable } from '../commands/common.ts'

const step = (msg: string) => process.stdout.write(`\n==> ${msg}\n`)

async function main(): Promise<number> {
  const why = missing({ root: true, commands: ['ip', 'nft', 'turnserver', 'qemu-system-x86_64'] })
  if (why.length > 0) {
    process.stderr.write(`demo: cannot run here: ${why.join('; ')}\n`)
    return 1
  }
  const t0 = Date.now()
  let net: Testnet | undefined
  const onSig = () => {
    process.stderr.write('\ndemo: interrupted, cleaning up\n')
    void net?.destroy().finally(() => process.exit(130))
  }
  process.once('SIGINT', onSig)
  try {
    step(
      "building an internet and three NAT'd clouds (network namespaces), bootstrap + coturn on the internet",
    )
    net = await createTestnet({
      clouds: [
        { name: 'aws', nat: 'cone' },
        { name: 'gcp', nat: 'cone' },
        { name: 'hetzner', nat: 'symmetric' },
      ],
      turn: true,
      noJoin: true,
    })
    process.stdout.write(`bootstrap ${net.boot.peerId} on ${net.topo.host('boot').ip}\n`)
    for (const c of net.topo.clouds) {
      process.stdout.write(
        `cloud ${c.name.padEnd(8)} ${c.nat.padEnd(9)} NAT, public ${c.publicIp}, host ${c.hosts[0]!.name} at ${c.hosts[0]!.ip}\n`,
      )
    }
    const names = net.topo.clouds.map((c) => c.hosts[0]!.name)
    for (const n of names) {
      step(`mesh invite  →  mesh join (on ${n})`)
      const a = await net.join(n)
      process.stdout.write(`${n} joined as ${a.peerId}\n`)
    }
    step('waiting for a WebRTC link between every pair of members')
    const view = await net.waitForFullMesh(names, 180_000)
    for (const n of names) {
      const rows = view
        .get(n)!
        .map((p: PeerRow) => [
          p.name,
          p.link,
          p.path ?? '-',
          p.rttMs === undefined ? '-' : `${p.rttMs.toFixed(1)} ms`,
        ])
      process.stdout.write(
        `\n$ mesh peers   (on ${n})\n${formatTable(['NAME', 'LINK', 'PATH', 'RTT'], rows)}\n`,
      )
    }
    step(`mesh bench ${names[1]}   (on ${names[0]}, 8 MiB over the data channel)`)
    const b = await net.agents
      .get(names[0]!)!
      .mesh(['bench', names[1]!, '--mib', '8'], { timeoutMs: 120_000 })
    process.stdout.write(b.code === 0 ? b.stdout : `bench failed: ${b.stderr}`)
    step(`done in ${((Date.now() - t0) / 1000).toFixed(1)} s; removing every namespace and process`)
    return 0
  } finally {
    process.off('SIGINT', onSig)
    await net?.destroy()
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`demo failed: ${err instanceof Error ? err.message : String(err)}\n`)
    process.exit(1)
  },
)
