import { resolve } from 'node:path'
import { Command } from 'commander'
import { UsageError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import type { ControlResult } from '../control/api.ts'
import { createProgressRenderer, formatBytes, type ProgressEvent } from '../progress.ts'
import {
  formatTable,
  interruptSignal,
  jsonOption,
  printJson,
  type StateOpts,
  stateOption,
  withAgent,
} from './common.ts'

/**
 * `mesh image push FILE... --name NAME[:TAG]`, `mesh image pull NAME[:TAG] [--dir DIR]`, `mesh image ls`.
 * The agent does the work (control methods image.push / image.pull / image.ls, see
 * net/chunks/images.ts imageControlHandlers); this file parses, streams progress, prints results.
 * ImageClient stays untyped so tests can inject a plain fake; results are cast to the control API's types.
 */
export interface ImageClient {
  call(
    method: string,
    params?: unknown,
    options?: { onEvent?: (event: unknown) => void; signal?: AbortSignal },
  ): Promise<unknown>
}

export type AgentRunner = <T>(opts: StateOpts, fn: (client: ImageClient) => Promise<T>) => Promise<T>

const REF_RE = /^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$/

function checkRef(ref: string): string {
  if (!REF_RE.test(ref)) throw new UsageError(`invalid image reference '${ref}' (expected NAME[:TAG])`)
  return ref.includes(':') ? ref : `${ref}:latest`
}

function progressFor(json: boolean, label: string) {
  const r = createProgressRenderer({ json, label, out: json ? process.stdout : process.stderr })
  return {
    onEvent: (e: unknown) => {
      const ev = e as ProgressEvent
      if (typeof ev?.phase === 'string' && typeof ev.doneBytes === 'number') r.update(ev)
    },
    done: () => r.done(),
  }
}

export function buildImageCommand(run: AgentRunner = withAgent as AgentRunner): Command {
  const cmd = new Command('image').description(
    'distribute kernel, initrd and disk images over the mesh as chunks',
  )

  cmd
    .command('push')
    .description('add files to the local chunk store as image NAME[:TAG]; members can then pull it')
    .argument('<files...>', 'files to include (stored by base name)')
    .requiredOption('--name <ref>', 'image name and optional tag, NAME[:TAG]')
    .addOption(stateOption())
    .addOption(jsonOption())
    .action(async (files: string[], opts: StateOpts & { json: boolean; name: string }) => {
      const ref = checkRef(opts.name)
      const abs = files.map((f) => resolve(f))
      const p = progressFor(opts.json, `push ${ref}`)
      const signal = interruptSignal()
      const res = (await run(opts, (c) =>
        c.call('image.push', { files: abs, ref }, { onEvent: p.onEvent, signal }),
      ).finally(() => p.done())) as ControlResult<'image.push'>
      if (opts.json) return printJson({ event: 'result', image: res })
      const total = res.files.reduce((s, f) => s + f.size, 0)
      process.stdout.write(
        `pushed ${res.name}:${res.tag}: ${res.files.length} file(s), ${formatBytes(total)}\n`,
      )
    })

  cmd
    .command('pull')
    .description('fetch image NAME[:TAG] from the members that hold it (skipping chunks already here)')
    .argument('<ref>', 'NAME[:TAG]')
    .option('--dir <dir>', 'also write the image files into this directory')
    .addOption(stateOption())
    .addOption(jsonOption())
    .action(async (refArg: string, opts: StateOpts & { json: boolean; dir?: string }) => {
      const ref = checkRef(refArg)
      const p = progressFor(opts.json, `pull ${ref}`)
      const signal = interruptSignal()
      const params = { ref, ...(opts.dir === undefined ? {} : { dir: resolve(opts.dir) }) }
      const res = (await run(opts, (c) =>
        c.call('image.pull', params, { onEvent: p.onEvent, signal }),
      ).finally(() => p.done())) as ControlResult<'image.pull'>
      if (opts.json) return printJson({ event: 'result', ...res })
      process.stdout.write(
        `pulled ${ref}: ${formatBytes(res.bytesFetched)} fetched, ${formatBytes(res.bytesSkipped)} already here or zero, ` +
          `${(res.elapsedMs / 1000).toFixed(1)} s\n`,
      )
    })

  cmd
    .command('ls')
    .description('list the images this agent holds')
    .addOption(stateOption())
    .addOption(jsonOption())
    .action(async (opts: StateOpts & { json: boolean }) => {
      const res = (await run(opts, (c) => c.call('image.ls', {}))) as ControlResult<'image.ls'>
      if (opts.json) return printJson(res)
      const rows = res.images.map((i) => [
        `${i.name}:${i.tag}`,
        i.files.map((f) => f.name).join(','),
        formatBytes(i.files.reduce((s, f) => s + f.size, 0)),
        i.created,
      ])
      process.stdout.write(`${formatTable(['IMAGE', 'FILES', 'SIZE', 'CREATED'], rows)}\n`)
    })

  return cmd
}

export const image: CommandModule = { build: () => buildImageCommand() }
