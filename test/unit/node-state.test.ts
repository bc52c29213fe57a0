import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MembershipError } from '../../net/membership/errors.ts'
import { createInvite } from '../../net/membership/invite.ts'
import { MemberSet } from '../../net/membership/member-set.ts'
import { createNetwork } from '../../net/membership/network.ts'
import {
  createMemberState,
  knownBootstrap,
  NETWORK_STATE_FILE,
  readNetworkState,
} from '../../net/node/state.ts'
import { silentLogger } from '../../src/base/log.ts'

describe('node member state file (net/node/state.ts)', () => {
  let dir: string
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'mesh-state-'))
  })
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('saves owner-only and loads back the network and bootstrap addresses', async () => {
    const key = await createNetwork('statenet')
    const a = createMemberState({ stateDir: dir, bootstrap: ['/ip4/1.2.3.4/tcp/1/p2p/x'], log: silentLogger })
    a.adopt(key.info, new MemberSet(key.info))
    a.addBootstrap(['/ip4/5.6.7.8/tcp/2/p2p/y', '/ip4/1.2.3.4/tcp/1/p2p/x'])
    await a.persist()
    await a.settled()
    assert.equal((await stat(join(dir, NETWORK_STATE_FILE))).mode & 0o777, 0o600)
    const b = createMemberState({ stateDir: dir, log: silentLogger })
    await b.load()
    assert.equal(b.network?.id, key.info.id)
    assert.deepEqual(b.bootstrap, ['/ip4/1.2.3.4/tcp/1/p2p/x', '/ip4/5.6.7.8/tcp/2/p2p/y'])
    const file = await readNetworkState(dir)
    assert.equal(file?.network.name, 'statenet')
  })

  it('no file: undefined; a corrupt one: MembershipError', async () => {
    assert.equal(await readNetworkState(dir), undefined)
    await writeFile(join(dir, NETWORK_STATE_FILE), '{not json')
    await assert.rejects(readNetworkState(dir), MembershipError)
    await writeFile(join(dir, NETWORK_STATE_FILE), '{"v":1}')
    await assert.rejects(readNetworkState(dir), /lacks the network/)
  })

  it('knownBootstrap: the invite’s and the saved ones; quiet about a bad invite or a corrupt file', async () => {
    const key = await createNetwork('bootnet')
    const inv = await createInvite(key, { bootstrap: ['/ip4/9.9.9.9/tcp/4001/p2p/z'], ttlMs: 60_000 })
    assert.deepEqual(await knownBootstrap(dir, inv.encoded), ['/ip4/9.9.9.9/tcp/4001/p2p/z'])
    await writeFile(join(dir, NETWORK_STATE_FILE), '{broken')
    assert.deepEqual(await knownBootstrap(dir, 'mesh1:garbage'), [])
    await rm(join(dir, NETWORK_STATE_FILE))
    const s = createMemberState({ stateDir: dir, bootstrap: ['/ip4/7.7.7.7/tcp/1/p2p/w'], log: silentLogger })
    s.adopt(key.info, new MemberSet(key.info))
    await s.persist()
    assert.deepEqual(await knownBootstrap(dir, ` ${inv.encoded}\n`), [
      '/ip4/9.9.9.9/tcp/4001/p2p/z',
      '/ip4/7.7.7.7/tcp/1/p2p/w',
    ])
    assert.match(await readFile(join(dir, NETWORK_STATE_FILE), 'utf8'), /"v":1/)
  })
})
