import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createLogger } from '../../src/base/log.ts'
import type { Conversation } from '../../vm/migration/conversation.ts'
import type { RamCache } from '../../vm/migration/interfaces.ts'
import { RamReceiver } from '../../vm/migration/ram-receiver.ts'
import type { Message } from '../../vm/migration/v1/messages.ts'

const CHUNK = 64 * 1024
const COUNT = 64

describe('RamReceiver: answering an offer from the cache', () => {
  let dir: string
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'mesh-ramrx-'))
  })
  afterEach(() => rmSync(dir, { recursive: true, force: true }))

  it('fills what the cache holds (reads in flight at once), wants the rest and what it could not read, ascending', async () => {
    const chunks = Array.from({ length: COUNT }, () => randomBytes(CHUNK))
    const hashes = chunks.map((c) => createHash('sha256').update(c).digest())
    // The cache holds every even chunk; chunk 10's entry is unreadable (gone or corrupt).
    const held = new Map(hashes.map((h, i) => [h.toString('hex'), i] as const).filter(([, i]) => i % 2 === 0))
    let reading = 0
    let maxReading = 0
    const cache = {
      has: (h: Uint8Array) => held.has(Buffer.from(h).toString('hex')),
      async get(h: Uint8Array) {
        const i = held.get(Buffer.from(h).toString('hex'))!
        reading++
        maxReading = Math.max(maxReading, reading)
        // Later chunks come back sooner: the fills happen out of order.
        await new Promise((r) => setTimeout(r, (COUNT - i) / 8))
        reading--
        if (i === 10) throw new Error('corrupt')
        return chunks[i]!
      },
    } as unknown as RamCache
    const ram = join(dir, 'ram')
    writeFileSync(ram, Buffer.alloc(COUNT * CHUNK))
    const rx = new RamReceiver(ram, COUNT * CHUNK, CHUNK, cache, createLogger({ level: 'error' }))
    const sent: Message[] = []
    const conv = { send: async (m: Message) => void sent.push(m) } as unknown as Conversation
    const indices = [...Array(COUNT).keys()]
    await rx.handle(
      { type: 'offer', sid: 's', batch: 0, indices, hashes: Buffer.concat(hashes) },
      { conv, sid: 's', signal: undefined },
    )
    rx.close()
    assert.equal(sent.length, 1)
    const want = sent[0] as Extract<Message, { type: 'want' }>
    assert.deepEqual(
      want.indices,
      [...indices.filter((i) => i % 2 === 1 || i === 10)].sort((a, b) => a - b),
    )
    assert.ok(maxReading > 1, 'reads overlap')
    const got = readFileSync(ram)
    for (let i = 0; i < COUNT; i += 2)
      if (i !== 10) assert.ok(got.subarray(i * CHUNK, (i + 1) * CHUNK).equals(chunks[i]!), `chunk ${i}`)
  })
})
