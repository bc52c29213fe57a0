import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { LineDecoder, QmpClient } from '../../vm/qemu/qmp.ts'

type Reply = (msg: { execute: string; id?: string; arguments?: unknown }, sock: Socket) => void

/** A scripted QMP server: sends the greeting, answers commands through `reply`. */
async function fakeQmp(path: string, reply: Reply, greeting = true): Promise<Server> {
  const server = createServer((sock) => {
    if (greeting)
      sock.write('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\n')
    let buf = ''
    sock.on('data', (d) => {
      buf += d.toString()
      let nl = buf.indexOf('\n')
      while (nl >= 0) {
        const msg = JSON.parse(buf.slice(0, nl))
        buf = buf.slice(nl + 1)
        nl = buf.indexOf('\n')
        if (msg.execute === 'qmp_capabilities')
          sock.write(`{"return": {}, "id": ${JSON.stringify(msg.id)}}\n`)
        else reply(msg, sock)
      }
    })
    sock.on('error', () => {})
  })
  await new Promise<void>((r) => server.listen(path, r))
  return server
}

describe('QMP client', () => {
  let dir: string
  let path: string
  let server: Server | undefined
  let client: QmpClient | undefined

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vm-qmp-'))
    path = join(dir, 'qmp.sock')
  })
  afterEach(async () => {
    client?.close()
    client = undefined
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()))
    server = undefined
    await rm(dir, { recursive: true, force: true })
  })

  it('negotiates, matches answers by id (even out of order), and delivers events', async () => {
    const held: Array<() => void> = []
    server = await fakeQmp(path, (msg, sock) => {
      const answer = () => sock.write(`{"return": {"cmd": "${msg.execute}"}, "id": "${msg.id}"}\n`)
      if (msg.execute === 'slow') held.push(answer)
      else {
        answer()
        if (msg.execute === 'fast') {
          sock.write('{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\n')
          for (const h of held.splice(0)) h()
        }
      }
    })
    client = await QmpClient.connect(path)
    assert.equal(client.greeting.version.qemu.major, 7)
    const events: string[] = []
    client.on('event', (e) => events.push(e.event))
    const stopEv = client.waitEvent('STOP', { timeoutMs: 5000 })
    const slow = client.execute<{ cmd: string }>('slow')
    const fast = client.execute<{ cmd: string }>('fast')
    assert.deepEqual(await fast, { cmd: 'fast' })
    assert.deepEqual(await slow, { cmd: 'slow' })
    assert.equal((await stopEv).timestamp?.seconds, 1)
    assert.deepEqual(events, ['STOP'])
  })

  it("turns QEMU errors into QmpError with QEMU's class and desc", async () => {
    server = await fakeQmp(path, (msg, sock) =>
      sock.write(`{"error": {"class": "DeviceNotFound", "desc": "no such thing"}, "id": "${msg.id}"}\n`),
    )
    client = await QmpClient.connect(path)
    await assert.rejects(
      client.execute('device_del', { id: 'x' }),
      (err: Error & { qmpClass?: string; desc?: string }) => {
        assert.equal(err.name, 'QmpError')
        assert.equal(err.qmpClass, 'DeviceNotFound')
        assert.equal(err.desc, 'no such thing')
        assert.match(err.message, /device_del/)
        return true
      },
    )
  })

  it('times out and aborts commands, and ignores their late answers', async () => {
    const late: Array<() => void> = []
    server = await fakeQmp(path, (msg, sock) =>
      late.push(() => sock.write(`{"return": 1, "id": "${msg.id}"}\n`)),
    )
    client = await QmpClient.connect(path)
    await assert.rejects(client.execute('x', undefined, { timeoutMs: 50 }), {
      name: 'QmpProtocolError',
      message: /no answer/,
    })
    const ac = new AbortController()
    const p = client.execute('y', undefined, { signal: ac.signal })
    ac.abort()
    await assert.rejects(p, { name: 'AbortError' })
    for (const l of late) l()
    server.removeAllListeners('connection')
    assert.equal(client.isClosed, false)
  })

  it('bad JSON from QEMU fails pending commands with QmpProtocolError and closes, without crashing', async () => {
    server = await fakeQmp(path, (_msg, sock) => sock.write('{"return": oops}\n'))
    client = await QmpClient.connect(path)
    const closed = new Promise<Error | undefined>((r) => client?.once('close', r))
    await assert.rejects(client.execute('x'), { name: 'QmpProtocolError', message: /bad JSON/ })
    assert.equal((await closed)?.name, 'QmpProtocolError')
    await assert.rejects(client.execute('y'), { name: 'QmpProtocolError', message: /closed/ })
  })

  it('refuses an over-long line', async () => {
    server = await fakeQmp(path, (_msg, sock) => sock.write(`{"return": "${'a'.repeat(5000)}"}\n`))
    client = await QmpClient.connect(path, { maxLineBytes: 1024 })
    await assert.rejects(client.execute('x'), { name: 'QmpProtocolError', message: /longer than 1024/ })
  })

  it('fails pending commands when QEMU goes away', async () => {
    server = await fakeQmp(path, (_msg, sock) => sock.destroy())
    client = await QmpClient.connect(path)
    await assert.rejects(client.execute('quit'), { name: 'QmpProtocolError', message: /closed/ })
  })

  it('fails to connect with a clear error: no socket, no greeting, not QMP', async () => {
    await assert.rejects(QmpClient.connect(join(dir, 'none.sock')), {
      name: 'QmpProtocolError',
      message: /cannot connect/,
    })
    server = await fakeQmp(path, () => {}, false)
    await assert.rejects(QmpClient.connect(path, { timeoutMs: 100 }), {
      name: 'QmpProtocolError',
      message: /no greeting/,
    })
  })

  it('line decoder: never throws anything but QmpProtocolError, reassembles split lines', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 20 }), (chunks) => {
        const d = new LineDecoder(100)
        try {
          for (const c of chunks) d.push(Buffer.from(c))
        } catch (err) {
          assert.equal((err as Error).name, 'QmpProtocolError')
        }
      }),
    )
    const d = new LineDecoder(100)
    assert.deepEqual(d.push(Buffer.from('{"a"')), [])
    assert.deepEqual(d.push(Buffer.from(':1}\n{"b":2}\n\n{')), ['{"a":1}', '{"b":2}'])
  })
})
