/**
 * src/agent/vm-tunnel.ts: which switch calls a VM's life (and a migration's host hooks) cause. Fakes
 * only: a VM is an EventEmitter with a status, the switch records calls.
 */
import assert from 'node:assert/strict'
import { EventEmitter } from 'node:events'
import type { TunnelSwitch } from '../../net/tunnel/interfaces.ts'
import type { TunnelService } from '../../src/agent/services/tunnel.ts'
import { plugVmsIntoTunnel } from '../../src/agent/vm-tunnel.ts'
import type { Vm, VmDriver, VmStatus } from '../../vm/driver/interfaces.ts'
import type { VmManager } from '../../vm/manager.ts'
import type { VmHost } from '../../vm/migration/interfaces.ts'
import { createMemoryLedger } from '../../vm/migration/ledger.ts'
import type { VmSpec } from '../../vm/spec.ts'

const MAC = '52:54:00:12:34:56'

class FakeVm extends EventEmitter {
  st: VmStatus
  readonly spec = { name: 'g', mac: MAC } as VmSpec
  constructor(st: VmStatus) {
    super()
    this.st = st
  }
  status(): VmStatus {
    return this.st
  }
  set(st: VmStatus, event?: 'paused' | 'resumed' | 'stopped'): void {
    this.st = st
    if (event !== undefined) this.emit(event, { at: Date.now() })
  }
}

function rig(holdWhilePaused?: boolean) {
  const calls: string[] = []
  const sw = {
    attachVm: (_mac: string, _path: string, o?: { hold?: boolean }) =>
      calls.push(`attach hold=${o?.hold === true}`),
    detachVm: async () => {
      calls.push('detach')
    },
    holdVm: () => calls.push('hold'),
    resumeVm: () => calls.push('resume'),
    announce: () => calls.push('announce'),
  } as unknown as TunnelSwitch
  const tunnel = { switch: sw } as TunnelService
  const manager = new EventEmitter() as unknown as VmManager
  const vms = new Map<string, FakeVm>()
  ;(manager as unknown as { get(n: string): FakeVm }).get = (n: string) => vms.get(n)!
  const driver = { handle: () => ({ paths: { net: '/tmp/none.sock' } }) } as unknown as VmDriver
  let incoming: FakeVm | undefined
  const inner = {
    get: (n: string) => vms.get(n) as unknown as Vm | undefined,
    allocateRam: async () => '/dev/null',
    discardRam: async () => {},
    startIncoming: async () => incoming as unknown as Vm,
    adopt: async (vm: Vm) => {
      vms.set('g', vm as unknown as FakeVm)
    },
    release: async (n: string) => {
      vms.delete(n)
    },
    token: () => 0,
    setToken: async () => {},
    ledger: createMemoryLedger(),
    handle: () => ({ spec: incoming!.spec, pid: 0, memoryPath: '/dev/null', paths: {} }),
    reattach: async () => incoming as unknown as Vm,
    beginSwitch: async () => {},
    endSwitch: async () => {},
    switches: () => [],
  } satisfies VmHost
  const host = plugVmsIntoTunnel(
    manager,
    driver,
    inner,
    () => tunnel,
    holdWhilePaused === undefined ? {} : { holdWhilePaused },
  )
  return {
    calls,
    host,
    start(vm: FakeVm) {
      vms.set('g', vm)
      ;(manager as unknown as EventEmitter).emit('started', { name: 'g' })
    },
    setIncoming(vm: FakeVm) {
      incoming = vm
    },
  }
}

describe('tunnel: VMs plugged into the switch (src/agent/vm-tunnel.ts)', () => {
  it('source: a pause holds frames, a resume (rollback) delivers them and announces, a move detaches', async () => {
    const r = rig(true)
    const vm = new FakeVm('running')
    r.start(vm)
    assert.deepEqual(r.calls.splice(0), ['attach hold=false', 'announce'])
    vm.set('paused', 'paused')
    assert.deepEqual(r.calls.splice(0), ['hold'])
    vm.set('running', 'resumed') // the move rolled back
    assert.deepEqual(r.calls.splice(0), ['resume', 'announce'])
    vm.set('paused', 'paused')
    vm.set('stopped', 'stopped') // moved away: the migration stops the source
    await r.host.release('g')
    assert.deepEqual(r.calls.splice(0), ['hold', 'detach'])
    vm.set('running', 'resumed') // unplugged: nothing more
    assert.deepEqual(r.calls, [])
  })

  it('destination: the incoming NIC holds until the guest resumes, then announces at once (not again on adopt)', async () => {
    const r = rig(true)
    const vm = new FakeVm('incoming')
    r.setIncoming(vm)
    await r.host.startIncoming({ name: 'g', mac: MAC } as VmSpec, '/dev/null')
    assert.deepEqual(r.calls.splice(0), ['attach hold=true'])
    vm.set('running', 'resumed')
    assert.deepEqual(r.calls.splice(0), ['resume', 'announce'])
    await r.host.adopt(vm as unknown as Vm)
    assert.deepEqual(r.calls, [])
  })

  it('holdWhilePaused false: the older behaviour (no holding, announce after adopt)', async () => {
    const r = rig(false)
    const vm = new FakeVm('incoming')
    r.setIncoming(vm)
    await r.host.startIncoming({ name: 'g', mac: MAC } as VmSpec, '/dev/null')
    vm.set('running', 'resumed')
    assert.deepEqual(r.calls.splice(0), ['attach hold=false'])
    await r.host.adopt(vm as unknown as Vm)
    assert.deepEqual(r.calls.splice(0), ['announce'])
    vm.set('paused', 'paused')
    assert.deepEqual(r.calls, [])
  })
})
