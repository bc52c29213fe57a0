/** Types of scripts/build.mjs (plain JS so that bin/mesh.js can run it without a TypeScript loader). */
export const ROOT: string
export const DIST: string
export const INFO_FILE: string
export const EXTERNAL: string[]
/** Why dist/ under `root` (default: this repository) is out of date, or undefined when it is fresh. */
export function staleReason(root?: string): string | undefined
export function build(options?: { quiet?: boolean }): Promise<unknown>
