import { MeshError } from '../src/base/errors.ts'

/** A VM spec failed validation. The message starts with the offending field, e.g. `spec.memoryMiB: ...`. */
export class VmSpecError extends MeshError {
  readonly field: string
  constructor(field: string, message: string, options: { cause?: unknown } = {}) {
    super(`${field}: ${message}`, { ...options, code: 'E_VM_SPEC' })
    this.field = field
  }
}

/** QEMU answered a QMP command with an error; `qmpClass`/`desc` are QEMU's own words. */
export class QmpError extends MeshError {
  readonly qmpClass: string
  readonly desc: string
  readonly command: string
  constructor(command: string, qmpClass: string, desc: string, options: { cause?: unknown } = {}) {
    super(`QMP ${command} failed: ${qmpClass}: ${desc}`, { ...options, code: 'E_QMP' })
    this.command = command
    this.qmpClass = qmpClass
    this.desc = desc
  }
}

/** The QMP connection itself failed: socket closed, timeout, garbage on the wire. */
export class QmpProtocolError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_QMP_PROTOCOL' })
  }
}

/** How a VM process ended. */
export interface VmExitInfo {
  /** Process exit code, or null when killed by a signal or unknown (a re-adopted VM is not our child). */
  code: number | null
  signal: string | null
  /** QEMU's SHUTDOWN reason when it told us one (`guest-shutdown`, `host-qmp-quit`, `host-signal`...). */
  reason?: string
  /** The last lines QEMU wrote to stderr and the serial console, newest last. */
  lastLines: string[]
}

/** The VM process ended (or never started) when it should not have. Carries exit status + last lines. */
export class VmExitedError extends MeshError {
  readonly exit: VmExitInfo
  constructor(what: string, exit: VmExitInfo, options: { cause?: unknown } = {}) {
    const status =
      exit.signal !== null
        ? `signal ${exit.signal}`
        : exit.code !== null
          ? `status ${exit.code}`
          : 'unknown status'
    const tail = exit.lastLines.length > 0 ? `; last output: ${exit.lastLines.slice(-5).join(' | ')}` : ''
    super(`${what}: QEMU exited with ${status}${tail}`, { ...options, code: 'E_VM_EXITED' })
    this.exit = exit
  }
}

/** An operation that the VM's current state does not allow (resume a stopped VM, load state twice...). */
export class VmStateError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_VM_STATE' })
  }
}

/** Starting a VM failed before it ran (missing kernel, QEMU binary missing, sockets never appeared). */
export class VmStartError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_VM_START' })
  }
}

/** Saving or loading device state failed. */
export class VmMigrationError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_VM_MIGRATION' })
  }
}

/** A VM name that the manager does not know. */
export class VmNotFoundError extends MeshError {
  constructor(name: string) {
    super(`no VM named '${name}' (see 'mesh vm ls')`, { code: 'E_VM_NOT_FOUND' })
  }
}
