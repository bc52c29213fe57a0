import type { Vm, VmDriver } from '../../vm/driver/interfaces.ts'
import type { VmManager } from '../../vm/manager.ts'
import type { VmHost } from '../../vm/migration/interfaces.ts'
import type { TunnelService } from './services/tunnel.ts'

export interface PlugOptions {
  /**
   * Hold frames for a guest while it does not run, and announce its MAC the moment it resumes
   * (default true). `false` restores the older behaviour (frames written into a paused QEMU, announce
   * after adopt): only for measuring what holding buys (`MESH_TUNNEL_HOLD=0` in the agent's env).
   */
  holdWhilePaused?: boolean
}

/** The tunnel side of a host's VMs: plug a VM's NIC in, and the VmHost hooks a migration calls. */
export interface VmTunnelPlug {
  /** Plugs a VM started outside migration (`mesh vm run`, a test's boot) and announces it if it runs. */
  started(vm: Vm): void
  /** The same host with the migration hooks wired to the switch (see plugVmsIntoTunnel). */
  wrap<H extends VmHost>(host: H): H
}

/**
 * Plugs VMs' NICs into the tunnel switch. A VM started here (`mesh vm run`) is attached and announced
 * at once. A migration's incoming VM is attached when it is started, with its frames held, and
 * announced the moment it resumes here (its 'resumed' event: before the source hears about it and
 * before adopt): until then the guest still runs on the source, which keeps the MAC. While a guest is
 * paused here (a migration's switch-over), the switch holds its frames instead of writing them into
 * a QEMU that does not read; they go to the new host on its announcement, or back to the guest here
 * if the move rolls back. A VM that moves away or stops is detached (the switch forwards stragglers
 * to its new host for a grace period).
 */
export function plugVmsIntoTunnel(
  manager: VmManager,
  driver: VmDriver,
  host: VmHost,
  tunnel: () => TunnelService,
  options: PlugOptions = {},
): VmHost {
  const plug = createVmTunnelPlug(driver, tunnel, options)
  manager.on('started', ({ name }) => {
    let vm: Vm
    try {
      vm = manager.get(name)
    } catch {
      return // it ended already; nothing to plug
    }
    plug.started(vm)
  })
  return plug.wrap(host)
}

/**
 * The plugging itself, without a VM manager: the agent composes it with one (plugVmsIntoTunnel), the
 * in-process migration rig (test/helpers/tunnel-migration-rig.ts) with a bare driver host, so both
 * run this code.
 */
export function createVmTunnelPlug(
  driver: VmDriver,
  tunnel: () => TunnelService,
  options: PlugOptions = {},
): VmTunnelPlug {
  const holdWhilePaused = options.holdWhilePaused ?? process.env.MESH_TUNNEL_HOLD !== '0'
  const attached = new Map<string, { vm: Vm; off: () => void }>()
  /** VMs whose MAC was announced since they last resumed (adopt must not announce it a second time). */
  const announced = new WeakSet<Vm>()
  const announce = (vm: Vm) => {
    announced.add(vm)
    tunnel().switch.announce(vm.spec.mac)
  }
  /** Forgets the NIC of `vm` (of whichever VM holds `mac`, without one); true when it was plugged. */
  const unplugNow = (mac: string, vm?: Vm): boolean => {
    const a = attached.get(mac)
    if (a === undefined || (vm !== undefined && a.vm !== vm)) return false
    attached.delete(mac)
    a.off()
    return true
  }
  const plug = (vm: Vm): boolean => {
    const mac = vm.spec.mac
    if (attached.get(mac)?.vm === vm) return false
    const socket = driver.handle(vm).paths.net
    if (socket === undefined || socket === '') return false
    const sw = () => tunnel().switch
    const onPaused = () => {
      if (attached.get(mac)?.vm === vm) sw().holdVm(mac)
    }
    const onResumed = () => {
      if (attached.get(mac)?.vm !== vm) return
      sw().resumeVm(mac)
      announce(vm)
    }
    const unplug = () => {
      if (unplugNow(mac, vm)) void sw().detachVm(mac)
    }
    const off = () => {
      vm.off('paused', onPaused)
      vm.off('resumed', onResumed)
      vm.off('stopped', unplug)
      vm.off('exited', unplug)
    }
    attached.set(mac, { vm, off })
    sw().attachVm(mac, socket, { hold: holdWhilePaused && vm.status() !== 'running' })
    if (holdWhilePaused) {
      vm.on('paused', onPaused)
      vm.on('resumed', onResumed)
    }
    vm.once('stopped', unplug)
    vm.once('exited', unplug)
    return true
  }
  return {
    started(vm) {
      // An incoming VM was plugged by startIncoming and announced when it resumed (or by adopt below).
      if (plug(vm) && vm.status() === 'running') announce(vm)
    },
    wrap: (host) => ({
      ...host,
      get: (name) => host.get(name),
      allocateRam: (spec, signal) => host.allocateRam(spec, signal),
      discardRam: (path) => host.discardRam(path),
      token: (name) => host.token(name),
      setToken: (name, token) => host.setToken(name, token),
      async startIncoming(spec, memoryPath, signal, options) {
        const vm = await host.startIncoming(spec, memoryPath, signal, options)
        plug(vm)
        return vm
      },
      async adopt(vm) {
        await host.adopt(vm)
        plug(vm)
        if (!announced.has(vm)) announce(vm)
      },
      async release(name) {
        const mac = host.get(name)?.spec.mac
        await host.release(name)
        if (mac !== undefined && unplugNow(mac)) await tunnel().switch.detachVm(mac)
      },
    }),
  }
}
