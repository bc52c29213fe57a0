/**
 * Where each VM of a host goes when the host must be emptied: a pure function over what the members
 * reported (placement.test.ts is its table).
 *
 * Order: VMs by priority (highest first), then by size (largest first: first-fit decreasing packs a
 * nearly full mesh better), then by name. First every VM whose warm standby's member has room for it
 * goes there (the standby already holds most of its RAM: that room is not given to another VM first);
 * then each other VM goes to the best member that still has room for it after the VMs placed before
 * it (RAM, disk and vCPUs all fit): no two VMs ever overcommit one member. "Best", compared in this
 * order:
 *   1. the member that holds this VM's warm standby (it already has most of the RAM);
 *   2. another provider than this host's (label `provider`; a spot notice often hits a whole provider
 *      or zone at once), members without the label count as another provider;
 *   3. the better link class: RTT ≤ 10 ms, ≤ 50 ms, ≤ 150 ms, slower or unknown; a relayed link (TURN or
 *      circuit relay) drops one class;
 *   4. the cheaper price (label `price`, a number; members without one sort after those with one);
 *   5. the lower RTT, then the most free RAM (spreads VMs), then the name (a stable answer).
 * Members that are draining, under a notice of their own, or this host itself are never destinations.
 */

export interface Room {
  ramMiB: number
  diskBytes: number
  vcpus: number
}

export interface PlacementVm {
  name: string
  memoryMiB: number
  vcpus: number
  /** Disk the VM needs at its destination (0 until VMs have writable disks of their own). */
  diskBytes: number
  /** Higher moves first (default 0). */
  priority: number
}

export interface Candidate {
  peer: string
  name: string
  labels: Readonly<Record<string, string>>
  free: Room
  draining: boolean
  underNotice: boolean
  rttMs?: number
  relayed?: boolean
  /** VMs whose warm standby this member holds. */
  standbys: readonly string[]
}

export interface PlacementInput {
  vms: readonly PlacementVm[]
  candidates: readonly Candidate[]
  self: { peer: string; labels: Readonly<Record<string, string>> }
  /** `mesh evacuate --to PEER`: only this member (by PeerId). */
  to?: string
}

export interface Assignment {
  vm: string
  to: string
  toName: string
  /** Why this member, for the report: e.g. ['standby', 'other-provider', 'rtt 31 ms', 'price 0.012']. */
  why: string[]
}

export interface Unplaced {
  vm: string
  /** One line a person can act on: what the VM needs and what the members have. */
  reason: string
}

export interface Placement {
  /** In the order the moves should run (priority first). */
  assignments: Assignment[]
  unplaced: Unplaced[]
}

export function orderVms(vms: readonly PlacementVm[]): PlacementVm[] {
  return [...vms].sort(
    (a, b) =>
      b.priority - a.priority ||
      b.memoryMiB - a.memoryMiB ||
      b.vcpus - a.vcpus ||
      (a.name < b.name ? -1 : a.name > b.name ? 1 : 0),
  )
}

function linkClass(c: Candidate): number {
  const rtt = c.rttMs
  let cls = rtt === undefined ? 3 : rtt <= 10 ? 0 : rtt <= 50 ? 1 : rtt <= 150 ? 2 : 3
  if (c.relayed === true) cls++
  return cls
}

function price(c: Candidate): number {
  const p = Number.parseFloat(c.labels.price ?? '')
  return Number.isFinite(p) && p >= 0 ? p : Number.POSITIVE_INFINITY
}

const fits = (free: Room, vm: PlacementVm) =>
  free.ramMiB >= vm.memoryMiB && free.diskBytes >= vm.diskBytes && free.vcpus >= vm.vcpus

function formatMiB(mib: number): string {
  return mib >= 1024 && mib % 1024 === 0 ? `${mib / 1024} GiB` : `${mib} MiB`
}

function shortfall(vm: PlacementVm, c: Candidate, free: Room): string {
  const lacks: string[] = []
  if (free.ramMiB < vm.memoryMiB) lacks.push(`${formatMiB(free.ramMiB)} RAM free`)
  if (free.vcpus < vm.vcpus) lacks.push(`${free.vcpus} vCPU free`)
  if (free.diskBytes < vm.diskBytes) lacks.push(`${Math.floor(free.diskBytes / 2 ** 20)} MiB disk free`)
  return `${c.name} ${lacks.join(', ')}`
}

export function place(input: PlacementInput): Placement {
  const selfProvider = input.self.labels.provider
  const free = new Map<string, Room>()
  for (const c of input.candidates) free.set(c.peer, { ...c.free })
  const assignments: Assignment[] = []
  const unplaced: Unplaced[] = []
  const describe = (c: Candidate, reasons: string[]): string[] => {
    if (selfProvider !== undefined && c.labels.provider !== selfProvider)
      reasons.push(`provider ${c.labels.provider ?? 'unlabelled'}`)
    if (c.rttMs !== undefined) reasons.push(`rtt ${c.rttMs.toFixed(0)} ms${c.relayed ? ' relayed' : ''}`)
    if (Number.isFinite(price(c))) reasons.push(`price ${c.labels.price}`)
    return reasons
  }
  const usable = input.candidates.filter(
    (c) => c.peer !== input.self.peer && (input.to === undefined || c.peer === input.to),
  )
  const ordered = orderVms(input.vms)
  const chosen = new Map<string, Assignment>()
  const take = (vm: PlacementVm, c: Candidate) => {
    const room = free.get(c.peer)!
    room.ramMiB -= vm.memoryMiB
    room.vcpus -= vm.vcpus
    room.diskBytes -= vm.diskBytes
  }
  // Pass 1: standbys first.
  for (const vm of ordered) {
    const c = usable.find(
      (m) => m.standbys.includes(vm.name) && !m.draining && !m.underNotice && fits(free.get(m.peer)!, vm),
    )
    if (c === undefined) continue
    take(vm, c)
    chosen.set(vm.name, { vm: vm.name, to: c.peer, toName: c.name, why: describe(c, ['standby']) })
  }
  for (const vm of ordered) {
    const pre = chosen.get(vm.name)
    if (pre !== undefined) {
      assignments.push(pre)
      continue
    }
    const need = `needs ${formatMiB(vm.memoryMiB)} RAM, ${vm.vcpus} vCPU${vm.diskBytes > 0 ? `, ${Math.ceil(vm.diskBytes / 2 ** 20)} MiB disk` : ''}`
    if (usable.length === 0) {
      unplaced.push({
        vm: vm.name,
        reason:
          input.to === undefined
            ? `no member to move to (no other member answered); ${need}`
            : `member ${input.to} did not answer`,
      })
      continue
    }
    const why: string[] = []
    const eligible: Candidate[] = []
    for (const c of usable) {
      if (c.draining) why.push(`${c.name} draining`)
      else if (c.underNotice) why.push(`${c.name} under a notice itself`)
      else if (!fits(free.get(c.peer)!, vm)) why.push(shortfall(vm, c, free.get(c.peer)!))
      else eligible.push(c)
    }
    if (eligible.length === 0) {
      unplaced.push({ vm: vm.name, reason: `no member has room: ${need}; ${why.join('; ')}` })
      continue
    }
    const key = (c: Candidate): number[] => [
      c.standbys.includes(vm.name) ? 0 : 1,
      selfProvider !== undefined && c.labels.provider === selfProvider ? 1 : 0,
      linkClass(c),
      price(c),
      c.rttMs ?? Number.POSITIVE_INFINITY,
      -free.get(c.peer)!.ramMiB,
    ]
    let best = eligible[0]!
    let bestKey = key(best)
    for (const c of eligible.slice(1)) {
      const k = key(c)
      let cmp = 0
      for (let i = 0; i < k.length && cmp === 0; i++)
        cmp = k[i]! < bestKey[i]! ? -1 : k[i]! > bestKey[i]! ? 1 : 0
      if (cmp < 0 || (cmp === 0 && c.name < best.name)) {
        best = c
        bestKey = k
      }
    }
    take(vm, best)
    assignments.push({ vm: vm.name, to: best.peer, toName: best.name, why: describe(best, []) })
  }
  return { assignments, unplaced }
}
