import assert from 'node:assert/strict'
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import {
  ensureGuest,
  type GuestImage,
  guestCacheRoot,
  readGuestManifest,
} from '../../fixtures/guest/build.ts'
import { newcArchive } from '../../fixtures/guest/cpio.ts'
import {
  CHARGEN_PORT,
  COUNTER_INTERVAL_MS,
  COUNTER_PORT,
  DISCARD_PORT,
  ECHO_PORT,
  MEMCHECK_PORT,
} from '../../fixtures/guest/ports.ts'
import { type BootedGuest, bootGuest } from '../../fixtures/guest/qemu.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { holdsWithin } from '../helpers/wait.ts'

const run = promisify(execFile)
const FIXTURE = new URL('../../fixtures/guest', import.meta.url).pathname

// ---------------------------------------------------------------------------------------------------
// Small TCP clients shared by the host and guest suites.

function connectTo(port: number, host = '127.0.0.1'): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ port, host })
    s.once('connect', () => {
      s.off('error', reject)
      resolve(s)
    })
    s.once('error', reject)
  })
}

/** A line-oriented client of the memory checker: `send('check')` resolves with the answer line. */
class LineClient {
  private buf = ''
  private waiters: Array<(line: string) => void> = []
  private lines: string[] = []
  constructor(readonly sock: Socket) {
    sock.setEncoding('utf8')
    sock.on('data', (d: string) => {
      this.buf += d
      let nl = this.buf.indexOf('\n')
      while (nl >= 0) {
        const line = this.buf.slice(0, nl)
        this.buf = this.buf.slice(nl + 1)
        const w = this.waiters.shift()
        if (w) w(line)
        else this.lines.push(line)
        nl = this.buf.indexOf('\n')
      }
    })
  }
  static async open(port: number): Promise<LineClient> {
    return new LineClient(await connectTo(port))
  }
  send(cmd: string, timeoutMs = 60_000): Promise<string> {
    this.sock.write(`${cmd}\n`)
    const queued = this.lines.shift()
    if (queued !== undefined) return Promise.resolve(queued)
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no answer to '${cmd}' in ${timeoutMs} ms`)), timeoutMs)
      this.waiters.push((line) => {
        clearTimeout(timer)
        resolve(line)
      })
    })
  }
  close(): void {
    this.sock.destroy()
  }
}

function field(line: string, name: string): number {
  const m = new RegExp(`\\b${name}=(\\d+)`).exec(line)
  assert.ok(m, `no ${name}= in '${line}'`)
  return Number(m[1])
}

/** Sends `data` to an echo service, half-closes, and resolves with everything that came back. */
async function echoRoundTrip(port: number, data: Buffer): Promise<Buffer> {
  const s = await connectTo(port)
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    s.on('data', (d: Buffer) => chunks.push(d))
    s.once('error', reject)
    s.once('end', () => {
      s.destroy()
      resolve(Buffer.concat(chunks))
    })
    s.end(data)
  })
}

/** Reads counter lines for `ms` milliseconds. */
async function readCounter(port: number, ms: number): Promise<Array<[number, number]>> {
  const s = await connectTo(port)
  s.setEncoding('utf8')
  let text = ''
  s.on('data', (d: string) => {
    text += d
  })
  await new Promise((r) => setTimeout(r, ms))
  s.destroy()
  return text
    .split('\n')
    .slice(0, -1) // the last piece may be a partial line
    .map((l) => {
      const [seq, up] = l.split(' ').map(Number)
      return [seq!, up!]
    })
}

function assertCounter(lines: Array<[number, number]>, minLines: number): void {
  assert.ok(lines.length >= minLines, `only ${lines.length} counter lines`)
  for (const [i, [seq, up]] of lines.entries()) {
    assert.equal(seq, i, `counter line ${i} has seq ${seq}`)
    assert.ok(Number.isFinite(up) && up > 0, `bad uptime on line ${i}`)
    if (i > 0) assert.ok(up >= lines[i - 1]![1], `uptime went back at line ${i}`)
  }
}

/** The memory checker's behaviour, the same on the host and in the guest. */
async function exerciseMemcheck(port: number, mib: number): Promise<void> {
  const mc = await LineClient.open(port)
  try {
    assert.equal(await mc.send('ping'), 'OK pong')
    const pages = (mib * 1024 * 1024) / 4096
    const filled = await mc.send(`fill ${mib}`)
    assert.equal(filled, `OK pages=${pages} bytes=${mib * 1024 * 1024} gen=${pages}`)
    assert.equal(await mc.send('check'), `OK pages=${pages} bytes=${mib * 1024 * 1024} gen=${pages}`)

    // dirty: rewrites exactly that much once, and the checker still finds everything intact.
    assert.equal(await mc.send('dirty 2'), `OK dirtied=512 gen=${pages + 512}`)
    assert.match(await mc.send('check'), new RegExp(`^OK pages=${pages} .* gen=${pages + 512}$`))

    // churn: a background writer keeps rewriting; checks stay OK and the generation keeps growing.
    assert.match(await mc.send('churn 16'), /^OK churn=16 window=\d+$/)
    // Checks until one shows the churn's rewrites (each must be OK on the way), not a fixed 600 ms.
    let during = ''
    await holdsWithin(
      async () => {
        during = await mc.send('check')
        assert.match(during, /^OK /)
        return field(during, 'gen') > pages + 512
      },
      30_000,
      100,
    )
    assert.ok(field(during, 'gen') > pages + 512, `churn rewrote nothing: ${during}`)
    assert.match(await mc.send('churn 0'), /^OK churn=0 /)
    const stats = await mc.send('stats')
    assert.ok(field(stats, 'churned') > 0, stats)
    assert.ok(field(stats, 'uptime_ms') > 0, stats)

    // The checker can fail: a flipped byte, a lost (zero) page and a stale page are each reported.
    assert.match(await mc.send('corrupt 100'), /^OK corrupted page=100 offset=\d+$/)
    assert.match(
      await mc.send('check'),
      /^BAD page=100 offset=\d+ expected=[0-9a-f]{2} got=[0-9a-f]{2} badpages=1 /,
    )
    await mc.send(`fill ${mib}`)
    assert.match(await mc.send('zero 7'), /^OK zeroed page=7$/)
    assert.match(await mc.send('check'), /^BAD page=7 offset=0 .*badpages=1 /)
    await mc.send(`fill ${mib}`)
    assert.match(await mc.send('stale 9'), /^OK stale page=9 gen=2$/)
    assert.match(
      await mc.send('check'),
      /^BAD page=9 offset=8 expected=02 got=01 badpages=1 pagegen=1 wantgen=2/,
    )

    assert.match(await mc.send('bogus'), /^ERR /)
    assert.match(await mc.send('fill lots'), /^ERR usage/)
    assert.equal(await mc.send('free'), 'OK freed')
    assert.match(await mc.send('check'), /^ERR nothing filled/)
  } finally {
    mc.close()
  }
}

// ---------------------------------------------------------------------------------------------------

describe('guest fixture: cpio writer', () => {
  it('writes a newc archive that cpio lists with the right types, modes and contents', async function () {
    requireOrSkip(this, { commands: ['cpio'] })
    const dir = mkdtempSync(join(tmpdir(), 'mesh-cpio-test-'))
    try {
      const archive = newcArchive([
        { type: 'dir', path: 'bin' },
        { type: 'file', path: 'bin/hello', data: Buffer.from('hi\n'), mode: 0o755 },
        { type: 'symlink', path: 'bin/sh', target: 'hello' },
        { type: 'char', path: 'console', major: 5, minor: 1 },
      ])
      assert.equal(archive.length % 4, 0)
      const p = join(dir, 'a.cpio')
      writeFileSync(p, archive)
      const { stdout } = await run('sh', ['-c', `cpio -itv < ${p}`])
      const lines = stdout.trim().split('\n')
      assert.equal(lines.length, 4)
      assert.match(lines[0]!, /^drwxr-xr-x .* bin$/)
      assert.match(lines[1]!, /^-rwxr-xr-x .* 3 .* bin\/hello$/)
      assert.match(lines[2]!, /^lrwxrwxrwx .* bin\/sh -> hello$/)
      assert.match(lines[3]!, /^crw------- .* 5,\s+1 .* console$/)
      await run('sh', [
        '-c',
        `cd ${dir} && mkdir x && cd x && cpio -id --quiet < ${p} 2>/dev/null; cat bin/hello`,
      ]).then(({ stdout: hello }) => assert.equal(hello, 'hi\n'))
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe('guest fixture: memcheck and netsvc on the host', function () {
  this.timeout(60_000)
  let dir = ''
  const procs: ChildProcess[] = []

  /** Starts a program in the foreground and resolves with its "listening" line. */
  function start(bin: string, args: string[]): Promise<string> {
    const p = spawn(bin, args, { stdio: ['ignore', 'pipe', 'inherit'] })
    procs.push(p)
    return new Promise((resolve, reject) => {
      let out = ''
      p.stdout!.setEncoding('utf8')
      p.stdout!.on('data', (d: string) => {
        out += d
        if (out.includes('\n')) resolve(out.split('\n')[0]!)
      })
      p.once('exit', (code) => reject(new Error(`${bin} exited with ${code}`)))
    })
  }

  before(async function () {
    requireOrSkip(this, { commands: ['gcc'] })
    dir = mkdtempSync(join(tmpdir(), 'mesh-guest-host-'))
    for (const prog of ['memcheck', 'netsvc']) {
      await run('gcc', [
        '-O2',
        '-Wall',
        '-Werror',
        '-pthread',
        '-o',
        join(dir, prog),
        join(FIXTURE, `${prog}.c`),
      ])
    }
  })

  after(async () => {
    for (const p of procs) {
      if (p.exitCode === null && p.signalCode === null) {
        p.kill('SIGKILL')
        await new Promise((r) => p.once('exit', r))
      }
    }
    if (dir) rmSync(dir, { recursive: true, force: true })
  })

  it('memcheck fills, dirties, churns, verifies, and detects a flipped byte, a lost page and a stale page', async () => {
    const line = await start(join(dir, 'memcheck'), ['0', '-f'])
    await exerciseMemcheck(field(line, 'port'), 16)
  })

  it('memcheck serves several clients at once', async () => {
    const line = await start(join(dir, 'memcheck'), ['0', '-f'])
    const port = field(line, 'port')
    const a = await LineClient.open(port)
    const b = await LineClient.open(port)
    try {
      assert.match(await a.send('fill 4'), /^OK pages=1024 /)
      assert.match(await b.send('check'), /^OK pages=1024 /)
      const [x, y] = await Promise.all([a.send('dirty 1'), b.send('dirty 1')])
      assert.match(x, /^OK dirtied=256 /)
      assert.match(y, /^OK dirtied=256 /)
      assert.match(await a.send('check'), /^OK pages=1024 bytes=4194304 gen=1536$/)
    } finally {
      a.close()
      b.close()
    }
  })

  it('netsvc echoes exactly for concurrent clients, and the counter counts with a monotonic uptime', async () => {
    const line = await start(join(dir, 'netsvc'), [
      '-f',
      'echo=0',
      'discard=0',
      'chargen=0',
      'counter=0',
      `interval=${COUNTER_INTERVAL_MS}`,
    ])
    const echoPort = field(line, 'echo')
    const blobs = [randomBytes(300_000), randomBytes(50_000), Buffer.from('hello\n')]
    const back = await Promise.all(blobs.map((b) => echoRoundTrip(echoPort, b)))
    for (const [i, b] of back.entries()) assert.ok(b.equals(blobs[i]!), `echo ${i} differs`)
    const lines = await readCounter(field(line, 'counter'), 600)
    assertCounter(lines, 5)
    const span = lines.at(-1)![1] - lines[0]![1]
    assert.ok(span >= COUNTER_INTERVAL_MS * (lines.length - 1) * 0.8, `counter too fast: ${span} ms`)
  })
})

describe('guest fixture: build and boot under QEMU', function () {
  this.timeout(240_000)
  let image: GuestImage
  let guest: BootedGuest | undefined
  let memPath = ''
  let fwd = new Map<number, number>()
  const mac = '52:54:00:6d:65:01'

  before(async function () {
    requireOrSkip(this, { commands: ['qemu-system-x86_64', 'busybox', 'gcc', 'cpio', 'dpkg-deb', 'apt-get'] })
    this.timeout(900_000) // a cold build downloads the kernel package
    const t0 = Date.now()
    image = await ensureGuest({ log: (s) => process.stdout.write(`      ${s}\n`) })
    process.stdout.write(`      guest image ready in ${Date.now() - t0} ms: ${image.dir}\n`)
  })

  after(async () => {
    await guest?.kill()
    if (memPath) rmSync(memPath, { force: true })
  })

  it('is cached by its recipe hash: a second ensureGuest returns the same image at once', async () => {
    const t0 = Date.now()
    const again = await ensureGuest()
    const ms = Date.now() - t0
    assert.deepEqual(again, image)
    assert.ok(ms < 15_000, `cached ensureGuest took ${ms} ms`)
    assert.ok(image.dir.startsWith(guestCacheRoot()))
    assert.equal(image.dir.split('/').at(-1), image.hash)
    const manifest = readGuestManifest(image)
    assert.equal(manifest.hash, image.hash)
    assert.match(manifest.kernelPackage, /^linux-image-.*cloud-amd64$/)
    assert.ok(manifest.initrdBytes > 500_000 && manifest.initrdBytes < 20_000_000, `${manifest.initrdBytes}`)
    // No debris of this image's build next to it (other hashes may be building right now, elsewhere).
    const debris = readdirSync(guestCacheRoot()).filter(
      (f) => f.startsWith(`.tmp-${image.hash.slice(0, 16)}`) || f === `${image.hash}.lock`,
    )
    assert.deepEqual(debris, [])
  })

  it('two builders racing on an empty cache produce one complete image and no debris', async () => {
    const cache = mkdtempSync(join(tmpdir(), 'mesh-guest-cache-test-'))
    // Kills both builders if the test fails or times out, before their cache directory is removed.
    const stop = new AbortController()
    const builds: Array<Promise<unknown>> = []
    try {
      const env = { ...process.env, MESH_GUEST_CACHE: cache }
      const build = join(FIXTURE, 'build.ts')
      for (let i = 0; i < 2; i++) {
        builds.push(
          run(process.execPath, ['--import', 'tsx', build], { env, maxBuffer: 1 << 20, signal: stop.signal }),
        )
      }
      const [a, b] = (await Promise.all(builds)) as Array<{ stdout: string; stderr: string }>
      const imgA = JSON.parse(a!.stdout) as GuestImage
      const imgB = JSON.parse(b!.stdout) as GuestImage
      assert.deepEqual(imgA, imgB)
      assert.equal(imgA.hash, image.hash, 'same recipe, same hash, whatever the cache directory')
      assert.deepEqual(
        readdirSync(cache).filter((f) => f !== 'kernel-resolution.json'),
        [image.hash],
      )
      // Only one of them built; the other waited for it (or found it done).
      const built = [a!.stderr, b!.stderr].filter((e) => e.includes('guest: built')).length
      assert.equal(built, 1, `stderr:\n${a!.stderr}\n${b!.stderr}`)
    } finally {
      stop.abort()
      await Promise.allSettled(builds)
      rmSync(cache, { recursive: true, force: true })
    }
  })

  it('boots to its ready line with the MAC and IP it was given', async function () {
    memPath = join('/dev/shm', `mesh-guest-test-${process.pid}-${randomBytes(3).toString('hex')}`)
    guest = bootGuest({
      image,
      memMiB: 256,
      mac,
      memPath,
      netdev: {
        type: 'user',
        hostfwd: [ECHO_PORT, COUNTER_PORT, MEMCHECK_PORT, DISCARD_PORT, CHARGEN_PORT].map((guestPort) => ({
          guestPort,
        })),
      },
    })
    const ready = await guest.waitReady({ timeoutMs: 150_000 })
    process.stdout.write(`      boot to ready: ${ready.bootMs} ms (${guest.accel})\n`)
    assert.equal(ready.ip, '10.0.2.15')
    assert.equal(ready.mac, mac)
    assert.ok(existsSync(memPath), 'the guest RAM file exists')
    fwd = await guest.forwards()
    for (const p of [ECHO_PORT, COUNTER_PORT, MEMCHECK_PORT])
      assert.ok(fwd.get(p), `no forward for port ${p}`)
    this.test!.title += ` (${ready.bootMs} ms, ${guest.accel})`
  })

  it('echo service returns exactly what was sent, to concurrent clients', async function () {
    if (!guest) this.skip()
    const blobs = [randomBytes(200_000), randomBytes(10_000), Buffer.from('mesh\n')]
    const back = await Promise.all(blobs.map((b) => echoRoundTrip(fwd.get(ECHO_PORT)!, b)))
    for (const [i, b] of back.entries()) {
      assert.ok(b.equals(blobs[i]!), `echo ${i}: sent ${blobs[i]!.length}, got ${b.length}`)
    }
  })

  it('counter service streams consecutive lines with a non-decreasing uptime', async function () {
    if (!guest) this.skip()
    const lines = await readCounter(fwd.get(COUNTER_PORT)!, 1500)
    assertCounter(lines, 5)
  })

  it('memory checker: fill 64 MiB → OK, churn and dirty stay OK, corruption → BAD', async function () {
    if (!guest) this.skip()
    const mc = await LineClient.open(fwd.get(MEMCHECK_PORT)!)
    try {
      const pages = 16384
      assert.equal(await mc.send('fill 64'), `OK pages=${pages} bytes=67108864 gen=${pages}`)
      assert.equal(await mc.send('check'), `OK pages=${pages} bytes=67108864 gen=${pages}`)
      assert.match(await mc.send('churn 4'), /^OK churn=4 window=16384$/)
      assert.match(await mc.send('dirty 8'), /^OK dirtied=2048 gen=\d+$/)
      let ok = ''
      await holdsWithin(
        async () => {
          ok = await mc.send('check')
          assert.match(ok, /^OK pages=16384 bytes=67108864 /)
          return field(ok, 'gen') > pages + 2048
        },
        30_000,
        100,
      )
      assert.ok(field(ok, 'gen') > pages + 2048, `churn rewrote nothing: ${ok}`)
      assert.match(await mc.send('churn 0'), /^OK/)
      assert.match(await mc.send('corrupt 12345'), /^OK corrupted page=12345 /)
      assert.match(await mc.send('check'), /^BAD page=12345 offset=\d+ .*badpages=1 /)
    } finally {
      mc.close()
    }
  })

  it('is killed with nothing left behind: no QEMU process, no temp directory', async function () {
    if (!guest) this.skip()
    const g = guest
    await g.kill()
    const exit = await g.exited
    assert.ok(exit.signal === 'SIGKILL' || exit.code !== null)
    assert.equal(existsSync(g.dir), false, 'the serial/QMP directory is gone')
    // pgrep exits 1 when nothing matches (and never lists itself).
    const left = await run('pgrep', ['-f', '--', g.dir]).then(
      ({ stdout }) => stdout.trim(),
      (err: { code?: number }) => (err.code === 1 ? '' : `pgrep failed: ${String(err)}`),
    )
    assert.equal(left, '', 'no process mentions the guest directory')
    rmSync(memPath, { force: true })
    assert.equal(existsSync(memPath), false)
    guest = undefined
  })
})

describe('guest fixture: network through a QEMU stream socket', function () {
  this.timeout(240_000)
  let guest: BootedGuest | undefined
  let dir = ''

  before(async function () {
    requireOrSkip(this, { commands: ['qemu-system-x86_64', 'busybox', 'gcc', 'cpio', 'dpkg-deb', 'apt-get'] })
    this.timeout(900_000)
    dir = mkdtempSync(join(tmpdir(), 'mesh-guest-stream-'))
    guest = bootGuest({
      image: await ensureGuest(),
      ip: '10.99.0.2/24',
      mtu: 1400,
      name: 'streamer',
      mac: '52:54:00:aa:bb:cc',
      netdev: { type: 'stream', path: join(dir, 'net.sock') },
    })
  })

  after(async () => {
    await guest?.kill()
    if (dir) rmSync(dir, { recursive: true, force: true })
  })

  it('takes its static IP from the command line and answers ARP with its MAC (length-prefixed frames)', async () => {
    const ready = await guest!.waitReady({ timeoutMs: 150_000 })
    assert.deepEqual([ready.ip, ready.mac, ready.name], ['10.99.0.2', '52:54:00:aa:bb:cc', 'streamer'])
    const sock = await new Promise<Socket>((resolve, reject) => {
      const s = connect(join(dir, 'net.sock'))
      s.once('connect', () => resolve(s))
      s.once('error', reject)
    })
    try {
      const me = Buffer.from('020000000001', 'hex')
      // Ethernet broadcast + ARP who-has 10.99.0.2 tell 10.99.0.1, padded to the 60-byte minimum.
      const arp = Buffer.alloc(60)
      Buffer.concat([
        Buffer.from('ffffffffffff', 'hex'),
        me,
        Buffer.from('08060001080006040001', 'hex'),
        me,
        Buffer.from([10, 99, 0, 1]),
        Buffer.alloc(6),
        Buffer.from([10, 99, 0, 2]),
      ]).copy(arp)
      const len = Buffer.alloc(4)
      len.writeUInt32BE(arp.length)
      const reply = new Promise<Buffer>((resolve, reject) => {
        let buf = Buffer.alloc(0)
        const timer = setTimeout(() => reject(new Error('no ARP reply in 30 s')), 30_000)
        sock.on('data', (d: Buffer) => {
          buf = Buffer.concat([buf, d])
          while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
            const frame = buf.subarray(4, 4 + buf.readUInt32BE(0))
            buf = buf.subarray(4 + frame.length)
            if (frame.readUInt16BE(12) === 0x0806 && frame.readUInt16BE(20) === 2) {
              clearTimeout(timer)
              resolve(frame)
            }
          }
        })
      })
      sock.write(Buffer.concat([len, arp]))
      const frame = await reply
      assert.equal(frame.subarray(0, 6).toString('hex'), '020000000001', 'sent to us')
      assert.equal(frame.subarray(22, 28).toString('hex'), '525400aabbcc', 'sender MAC is the guest')
      assert.deepEqual([...frame.subarray(28, 32)], [10, 99, 0, 2], 'sender IP is the guest')
    } finally {
      sock.destroy()
    }
  })
})
