import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildQemuArgs, kernelCmdline, kvmUsable } from '../../vm/qemu/args.ts'
import { loadVmSpecFile, macForName, parseImageRef, parseVmSpec, validateVmSpec } from '../../vm/spec.ts'

const base = { name: 'web1', memoryMiB: 256, kernel: '/k/vmlinuz' }

function specError(input: unknown, field: RegExp): void {
  assert.throws(
    () => validateVmSpec(input),
    (err: Error) => {
      assert.equal(err.name, 'VmSpecError')
      assert.match(err.message, field)
      return true
    },
  )
}

describe('VM spec', () => {
  it('normalises a minimal spec: default vcpus, MAC derived from the name', () => {
    const s = validateVmSpec(base)
    assert.equal(s.vcpus, 1)
    assert.equal(s.mac, macForName('web1'))
    assert.match(s.mac, /^52:54:00(:[0-9a-f]{2}){3}$/)
    assert.notEqual(macForName('web2'), s.mac)
  })

  it('names the field in every validation error', () => {
    specError(null, /^spec: must be a JSON object/)
    specError({ ...base, memoryMiB: 0 }, /^spec\.memoryMiB: must be an integer/)
    specError({ ...base, memoryMiB: '256' }, /^spec\.memoryMiB: /)
    specError({ ...base, memoryMiB: 1.5 }, /^spec\.memoryMiB: /)
    specError({ ...base, vcpus: 0 }, /^spec\.vcpus: /)
    specError({ ...base, name: '' }, /^spec\.name: /)
    specError({ ...base, name: 'a b' }, /^spec\.name: /)
    specError({ ...base, name: undefined }, /^spec\.name: is required/)
    specError({ ...base, kernel: undefined }, /^spec\.kernel: is required/)
    specError({ ...base, kernel: 7 }, /^spec\.kernel: must be a string/)
    specError({ ...base, kernel: '/a,b' }, /^spec\.kernel: .*commas/)
    specError({ ...base, kernel: 'image:' }, /^spec\.kernel: bad image name/)
    specError({ ...base, mac: 'zz:00:00:00:00:00' }, /^spec\.mac: /)
    specError({ ...base, mac: '01:00:00:00:00:00' }, /^spec\.mac: must be unicast/)
    specError({ ...base, ip: '10.0.0.300/24' }, /^spec\.ip: /)
    specError({ ...base, ip: '10.0.0.3' }, /^spec\.ip: /)
    specError({ ...base, cmdline: 'a\nb' }, /^spec\.cmdline: /)
    specError({ ...base, memory: 5 }, /^spec\.memory: unknown field/)
  })

  it('keeps image names for the chunk layer and parses them', () => {
    const s = validateVmSpec({ ...base, kernel: 'image:guest-kernel:6.1', initrd: 'image:guest-initrd' })
    assert.equal(s.kernel, 'image:guest-kernel:6.1')
    assert.deepEqual(parseImageRef(s.kernel), { name: 'guest-kernel', tag: '6.1' })
    assert.deepEqual(parseImageRef('image:x'), { name: 'x', tag: 'latest' })
    assert.equal(parseImageRef('/boot/vmlinuz'), undefined)
  })

  it('a writable disk: disk {base, sizeGiB} is stored as volume; bases are images or paths', () => {
    const s = validateVmSpec({ ...base, disk: { base: 'debian-pg:1', sizeGiB: 8 } })
    assert.deepEqual(s.volume, { base: 'image:debian-pg:1', sizeGiB: 8 })
    assert.equal(s.disk, undefined)
    assert.deepEqual(validateVmSpec({ ...base, disk: { base: 'image:debian-pg' } }).volume, {
      base: 'image:debian-pg:latest',
    })
    assert.deepEqual(validateVmSpec({ ...base, disk: { base: '/img/base.raw' } }).volume, {
      base: '/img/base.raw',
    })
    assert.deepEqual(validateVmSpec({ ...base, disk: { base: './base.raw' } }, '/specs').volume, {
      base: '/specs/base.raw',
    })
    // The stored form validates again (the spec travels in a migration's prepare).
    assert.deepEqual(validateVmSpec(JSON.parse(JSON.stringify(s))), s)
    specError({ ...base, disk: { sizeGiB: 8 } }, /^spec\.disk\.base: is required/)
    specError({ ...base, disk: { base: 'bad name!' } }, /^spec\.disk\.base: bad image name/)
    specError({ ...base, disk: { base: '/a,b' } }, /^spec\.disk\.base: .*commas/)
    specError({ ...base, disk: { base: 'x:1', sizeGiB: 0 } }, /^spec\.disk\.sizeGiB: must be an integer/)
    specError({ ...base, disk: { base: 'x:1', sizeGiB: 2.5 } }, /^spec\.disk\.sizeGiB: /)
    specError({ ...base, disk: { base: 'x:1', size: 2 } }, /^spec\.disk\.size: unknown field/)
    specError({ ...base, disk: ['x'] }, /^spec\.disk: must be an object/)
    specError({ ...base, disk: '/d.raw', volume: { base: 'x:1' } }, /^spec\.disk: .*not both/)
  })

  it('parses JSON, names the file on bad JSON, resolves relative paths against the file', async () => {
    assert.throws(() => parseVmSpec('{', undefined, 'x.json'), {
      name: 'VmSpecError',
      message: /^x\.json: is not valid JSON/,
    })
    const dir = await mkdtemp(join(tmpdir(), 'vm-spec-'))
    try {
      const file = join(dir, 'vm.json')
      await writeFile(
        file,
        JSON.stringify({ ...base, kernel: 'vmlinuz', initrd: 'image:i', mac: '52:54:00:AB:CD:EF' }),
      )
      const s = await loadVmSpecFile(file)
      assert.equal(s.kernel, join(dir, 'vmlinuz'))
      assert.equal(s.initrd, 'image:i')
      assert.equal(s.mac, '52:54:00:ab:cd:ef')
      await assert.rejects(loadVmSpecFile(join(dir, 'none.json')), { name: 'VmSpecError' })
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})

describe('QEMU arguments', () => {
  const paths = {
    ramPath: '/dev/shm/m/a.ram',
    qmpPath: '/r/q.sock',
    consolePath: '/r/c.log',
    netPath: '/r/n.sock',
  }

  it('puts RAM in a shared file backend, no VGA/defaults, QMP, serial log, and a stream NIC as server', () => {
    const spec = validateVmSpec({
      ...base,
      vcpus: 2,
      ip: '10.1.0.2/24',
      cmdline: 'quiet',
      initrd: '/k/initrd',
    })
    const args = buildQemuArgs(spec, paths, { accel: 'tcg' })
    const joined = args.join(' ')
    assert.match(joined, /-accel tcg /)
    assert.match(
      joined,
      /-object memory-backend-file,id=mem,size=256M,mem-path=\/dev\/shm\/m\/a\.ram,share=on/,
    )
    assert.match(joined, /-machine pc,memory-backend=mem/)
    assert.match(joined, /-nodefaults/)
    assert.match(joined, /-vga none/)
    assert.match(joined, /-smp 2/)
    assert.match(joined, /-qmp unix:\/r\/q\.sock,server=on,wait=off/)
    assert.match(joined, /-chardev file,id=ser0,path=\/r\/c\.log/)
    assert.match(joined, /-netdev stream,id=n0,server=on,addr\.type=unix,addr\.path=\/r\/n\.sock/)
    assert.match(joined, new RegExp(`-device virtio-net-pci,netdev=n0,mac=${spec.mac},romfile=`))
    assert.equal(args[args.indexOf('-append') + 1], 'console=ttyS0 no_timer_check mesh.ip=10.1.0.2/24 quiet')
    assert.equal(args[args.indexOf('-initrd') + 1], '/k/initrd')
    assert.ok(args.includes('-S'), 'CPUs start stopped: the driver sets capabilities, then cont')
    assert.ok(!args.includes('-incoming'))
  })

  it('incoming mode, user networking for tests, kvm, disks, and comma escaping', () => {
    const spec = validateVmSpec({ ...base, disk: '/d/disk.qcow2' })
    const args = buildQemuArgs(
      spec,
      { ...paths, ramPath: '/x,y.ram' },
      { accel: 'kvm', incoming: true, net: { type: 'user', hostfwd: [{ hostPort: 5000, guestPort: 7 }] } },
    )
    const joined = args.join(' ')
    assert.match(joined, /-accel kvm /)
    assert.match(joined, /-incoming defer/)
    assert.match(joined, /-netdev user,id=n0,hostfwd=tcp:127\.0\.0\.1:5000-:7/)
    assert.match(joined, /mem-path=\/x,,y\.ram,share=on/)
    assert.match(joined, /-drive file=\/d\/disk\.qcow2,if=virtio,format=qcow2/)
    assert.equal(kernelCmdline(validateVmSpec(base)), 'console=ttyS0 no_timer_check')
  })

  it('a writable disk is a named qcow2 node on virtio-blk; image files replace image references', () => {
    const spec = validateVmSpec({ ...base, kernel: 'image:k:1', disk: { base: 'debian-pg:1' } })
    const args = buildQemuArgs(
      spec,
      { ...paths, volumePath: '/v/web1.qcow2', kernelPath: '/files/k/1/vmlinuz' },
      { accel: 'tcg' },
    ).join(' ')
    assert.match(args, /-drive file=\/v\/web1\.qcow2,if=none,id=vol0-drive,node-name=vol0,format=qcow2,/)
    assert.match(args, /-device virtio-blk-pci,drive=vol0-drive,/)
    assert.match(args, /-kernel \/files\/k\/1\/vmlinuz /)
    assert.throws(() => buildQemuArgs(spec, paths, { accel: 'tcg' }), /no volume path/)
  })

  it('MESH_ACCEL overrides the KVM probe', () => {
    assert.equal(kvmUsable({ MESH_ACCEL: 'tcg' }), false)
    assert.equal(kvmUsable({ MESH_ACCEL: 'kvm' }), true)
  })
})
