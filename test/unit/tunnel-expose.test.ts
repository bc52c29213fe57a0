import assert from 'node:assert/strict'
import { connect, createServer, type Server } from 'node:net'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import { createTunnelService, type TunnelService } from '../../src/agent/services/tunnel.ts'
import { silentLogger } from '../../src/base/log.ts'
import { parseTarget } from '../../src/commands/expose.ts'

function echoServer(): Promise<Server> {
  const srv = createServer({ allowHalfOpen: true }, (s) => {
    s.on('error', () => {})
    s.pipe(s)
  })
  return new Promise((r) => srv.listen(0, '127.0.0.1', () => r(srv)))
}

/** Sends `data`, half-closes, and collects everything until the other side closes. */
function roundTrip(port: number, data: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const c = connect({ host: '127.0.0.1', port, allowHalfOpen: true })
    const got: Buffer[] = []
    c.on('data', (d: Buffer) => got.push(d))
    c.on('error', reject)
    c.on('end', () => {
      c.end()
      resolve(Buffer.concat(got))
    })
    c.end(data)
  })
}

describe('tunnel service: mesh expose', () => {
  let echo: Server
  let svc: TunnelService
  beforeEach(async () => {
    echo = await echoServer()
    svc = createTunnelService({
      overlay: createMemoryNetwork().node('a'),
      log: silentLogger,
      resolveVm: (vm) => (vm === 'web' ? '127.0.0.1/24' : undefined),
      exposeWithoutTap: true,
    })
    await svc.start(new AbortController().signal)
  })
  afterEach(async () => {
    await svc.stop()
    await new Promise((r) => echo.close(r))
  })

  it('proxies TCP connections to the guest port, half-close included, and removes them on unexpose', async () => {
    const port = (echo.address() as { port: number }).port
    const h = svc.handlers()
    const info = await h.expose(
      { vm: 'web', port, listen: '127.0.0.1:0' },
      {
        emit: () => {},
        signal: new AbortController().signal,
      },
    )
    assert.equal(info.target, '127.0.0.1')
    const listenPort = Number(info.listen.split(':').at(-1))
    const data = Buffer.alloc(300_000, 7)
    const [r1, r2] = await Promise.all([
      roundTrip(listenPort, data),
      roundTrip(listenPort, Buffer.from('hi')),
    ])
    assert.equal(r1.length, data.length)
    assert.ok(r1.equals(data))
    assert.equal(r2.toString(), 'hi')
    const list = await h['expose.list'](null, {
      emit: () => {},
      signal: new AbortController().signal,
    })
    assert.equal(list[0]?.total, 2)
    assert.deepEqual(await svc.unexpose(info.listen), true)
    await assert.rejects(roundTrip(listenPort, Buffer.from('x')), /ECONNREFUSED/)
  })

  it('refuses unknown VMs, bad params, and expose without a TAP port', async () => {
    await assert.rejects(svc.expose({ vm: 'nope', port: 80, listen: '127.0.0.1:0' }), { name: 'ExposeError' })
    await assert.rejects(svc.expose({ vm: 'web', port: 80, listen: 'nonsense' }), { name: 'ExposeError' })
    const ctx = { emit: () => {}, signal: new AbortController().signal }
    await assert.rejects(svc.handlers().expose!({ vm: 'web', port: 0, listen: '127.0.0.1:0' }, ctx), {
      name: 'ExposeError',
    })
    const noTap = createTunnelService({ overlay: createMemoryNetwork().node('b'), log: silentLogger })
    await noTap.start(new AbortController().signal)
    await assert.rejects(
      noTap.expose({ vm: '10.1.2.3', port: 80, listen: '127.0.0.1:0' }),
      /needs the host TAP/,
    )
    await noTap.stop()
  })

  it('parses VM:PORT on the command line', () => {
    assert.deepEqual(parseTarget('web:80'), { vm: 'web', port: 80 })
    assert.deepEqual(parseTarget('10.0.0.5:7'), { vm: '10.0.0.5', port: 7 })
    assert.throws(() => parseTarget('web'), { name: 'UsageError' })
    assert.throws(() => parseTarget('web:0'), { name: 'UsageError' })
    assert.throws(() => parseTarget(':80'), { name: 'UsageError' })
  })
})
