import type { TunnelService } from '../../net/tunnel/service.ts'
import type { Vm, VmDriver } from '../../vm/driver/interfaces.ts'
import type { VmManager } from '../../vm/manager.ts'
import type { VmHost } from '../../vm/migration/interfaces.ts'

/**
 * Plugs VMs' NICs into the tunnel switch. A VM started here (`mesh vm run`) is attached and announced
 * at once. A migration's incoming VM is attached when it is started (so late frames can be held) but
 * only announced once it runs here (adopt): until then the guest still runs on the source, which
 * keeps the MAC. A VM that moves away or stops is detached (the switch forwards stragglers to its new
 * host for a grace period).
 */
export function plugVmsIntoTunnel(
  manager: VmManager,
  driver: VmDriver,
  host: VmHost,
  tunnel: () => TunnelService,
): VmHost {
  const attached = new Map<string, Vm>()
  const plug = (vm: Vm): boolean => {
    const mac = vm.spec.mac
    if (attached.get(mac) === vm) return false
    const socket = driver.handle(vm).paths.net
    if (socket === undefined || socket === '') return false
    attached.set(mac, vm)
    tunnel().switch.attachVm(mac, socket)
    const unplug = () => {
      if (attached.get(mac) !== vm) return
      attached.delete(mac)
      void tunnel().switch.detachVm(mac)
    }
    vm.once('stopped', unplug)
    vm.once('exited', unplug)
    return true
  }
  manager.on('started', ({ name }) => {
    let vm: Vm
    try {
      vm = manager.get(name)
    } catch {
      return // it ended already; nothing to plug
    }
    // An incoming VM was plugged by startIncoming and is announced by adopt below.
    if (plug(vm) && vm.status() === 'running') tunnel().switch.announce(vm.spec.mac)
  })
  return {
    ...host,
    get: (name) => host.get(name),
    allocateRam: (spec, signal) => host.allocateRam(spec, signal),
    discardRam: (path) => host.discardRam(path),
    token: (name) => host.token(name),
    setToken: (name, token) => host.setToken(name, token),
    async startIncoming(spec, memoryPath, signal) {
      const vm = await host.startIncoming(spec, memoryPath, signal)
      plug(vm)
      return vm
    },
    async adopt(vm) {
      await host.adopt(vm)
      plug(vm)
      tunnel().switch.announce(vm.spec.mac)
    },
    async release(name) {
      const mac = host.get(name)?.spec.mac
      await host.release(name)
      if (mac !== undefined && attached.has(mac)) {
        attached.delete(mac)
        await tunnel().switch.detachVm(mac)
      }
    },
  }
}
