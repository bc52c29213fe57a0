/**
 * `npm run demo`: the main job on one machine. Builds an internet and three clouds behind NATs out of
 * network namespaces, starts a bootstrap member (circuit relay + STUN) and coturn on the internet, joins
 * one host per cloud with invites through the `mesh` CLI, and shows the resulting mesh: every pair of
 * members with its link, path type (host/srflx/relay) and RTT, plus a throughput sample. Then it boots a
 * QEMU guest in one cloud, keeps a client's TCP connection to it open from a third cloud, moves the VM
 * to another cloud and back, and prints each move's report and the longest stall. Everything it
 * creates is removed at the end, also on Ctrl-C.
 *
 * The clouds' uplinks run on the `crosscloud` WAN profile (30 ms between clouds, 1 Gbit/s, 0.05% loss;
 * fixtures/wan/profiles.ts) unless `--profile lan|region|crosscloud|intercontinental` says otherwise
 * (`npm run demo -- --profile lan`); what the emulation achieves is measured and printed first.
 */

import { ensureGuest } from '../../fixtures/guest/build.ts'
import { ECHO_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines, waitForExit } from '../../fixtures/testnet/clouds.ts'
import { missing } from '../../fixtures/testnet/prereq.ts'
import { createTestnet, type PeerRow, runGuestVm, type Testnet } from '../../fixtures/testnet/testnet.ts'
import { PROFILE_NAMES, type ProfileName } from '../../fixtures/wan/profiles.ts'
import { formatTable } from '../commands/common.ts'

const GUEST_IP = '10.99.0.10'
const STREAM_CLIENT = new URL('../../fixtures/testnet/stream-client.ts', import.meta.url).pathname
const step = (msg: string) => process.stdout.write(`\n==> ${msg}\n`)

function parseArgs(argv: string[]): { profile: ProfileName } | string {
  let profile: ProfileName = 'crosscloud'
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!
    if (a === '--help' || a === '-h') {
      return `usage: npm run demo [-- --profile ${PROFILE_NAMES.join('|')}]   (default crosscloud)`
    }
    const v = a === '--profile' ? argv[++i] : a.startsWith('--profile=') ? a.slice(10) : undefined
    if (v === undefined) return `demo: unknown argument '${a}' (try --help)`
    if (!PROFILE_NAMES.includes(v as ProfileName))
      return `demo: unknown profile '${v}' (have: ${PROFILE_NAMES.join(', ')})`
    profile = v as ProfileName
  }
  return { profile }
}

async function main(): Promise<number> {
  const parsed = parseArgs(process.argv.slice(2))
  if (typeof parsed === 'string') {
    process.stderr.write(`${parsed}\n`)
    return parsed.startsWith('usage') ? 0 : 2
  }
  const { profile } = parsed
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
      `building an internet and three NAT'd clouds (network namespaces) on the '${profile}' WAN profile, bootstrap + coturn on the internet`,
    )
    net = await createTestnet({
      profile,
      measureWan: 'full',
      log: (line) => process.stdout.write(`${line}\n`),
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
        `cloud ${c.name.padEnd(8)} ${c.nat.padEnd(9)} NAT, public ${c.publicIp}, host ${c.hosts[0]!.name} at ${c.hosts[0]!.ip}, uplink ${c.profile.name}\n`,
      )
    }
    const names = net.topo.clouds.map((c) => c.hosts[0]!.name)
    const clientName = names[2]!
    for (const n of names) {
      // The last member also plugs a host TAP into the guest network: it plays the user's client.
      const tap = n === clientName ? ['--tap', 'mesh0', '--address', '10.99.0.1/24'] : []
      step(`mesh invite  →  mesh join ${tap.join(' ')}  (on ${n})`)
      const a = await net.join(n, { args: tap })
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
    // Small on long paths: the WebRTC link's throughput there is what `npm run bench -- wan` measures.
    const mib = profile === 'lan' || profile === 'region' ? 8 : 2
    step(`mesh bench ${names[1]} --mib ${mib}   (on ${names[0]}, over the data channel)`)
    const b = await net.agents
      .get(names[0]!)!
      .mesh(['bench', names[1]!, '--mib', String(mib)], { timeoutMs: 300_000 })
    process.stdout.write(b.code === 0 ? b.stdout : `bench failed: ${b.stderr}`)
    const [src, dst] = [net.agents.get(names[0]!)!, net.agents.get(names[1]!)!]
    const client = net.agents.get(clientName)!
    step(
      `mesh vm run g1.json   (on ${src.name}: a 256 MiB QEMU guest, 10.99.0.10, NIC plugged into the overlay)`,
    )
    const image = await ensureGuest()
    await runGuestVm(src, image, { name: 'g1', ip: `${GUEST_IP}/24` })
    process.stdout.write('guest is up\n')
    step(`a client on ${clientName} opens a TCP echo stream to the guest and keeps it open across the moves`)
    const stream = client.host.spawn(process.execPath, [
      '--import',
      'tsx',
      STREAM_CLIENT,
      GUEST_IP,
      String(ECHO_PORT),
      '600000',
    ])
    await new Promise((r) => setTimeout(r, 2000))
    for (const [from, to] of [
      [src, dst],
      [dst, src],
    ] as const) {
      step(`mesh migrate g1 --to ${to.name}   (on ${from.name})`)
      const m = await from.mesh(['migrate', 'g1', '--to', to.name], { timeoutMs: 300_000 })
      process.stdout.write(m.code === 0 ? m.stdout : `migrate failed: ${m.stderr}`)
      if (m.code !== 0) return 1
    }
    stream.kill('SIGTERM')
    await waitForExit(stream, 30_000)
    const res = JSON.parse(
      outputLines(stream)
        .filter((l) => l.startsWith('{'))
        .at(-1) ?? '{}',
    ) as {
      resets?: number
      mismatches?: number
      bytesEchoed?: number
      maxGapMs?: number
    }
    step('the client connection across both moves')
    process.stdout.write(
      `${res.bytesEchoed ?? 0} bytes echoed, ${res.mismatches ?? '?'} mismatches, ${res.resets ?? '?'} resets, longest stall ${res.maxGapMs ?? '?'} ms\n`,
    )
    await src.mesh(['vm', 'stop', 'g1'])
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
