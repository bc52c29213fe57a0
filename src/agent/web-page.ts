/**
 * The web view's one page (served by web.ts): no framework, no external resources (the CSP allows
 * none). It draws the members around a circle with this node's links (path, RTT, tunnel throughput),
 * the VMs under the member that runs them, and each migration as a bar of its phases, from
 * /api/events (server-sent events: 'state' snapshots every second, 'migration' on every change).
 * Elements the tests look for carry data-* attributes (data-vm, data-member, data-migration).
 */
export const WEB_PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mesh</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa }
h1 { font-size: 18px; margin: 0 0 8px } h2 { font-size: 15px; margin: 18px 0 6px }
#conn { font-size: 12px; color: #888 } svg { background: #fff; border: 1px solid #ddd }
.member circle { fill: #e8f0fe; stroke: #3367d6; stroke-width: 2 } .member.self circle { fill: #d2e3fc }
.member.down circle { fill: #eee; stroke: #999 } .member text { font-size: 12px; text-anchor: middle }
.vmchip { font-size: 11px; fill: #0b8043 } line.link { stroke: #3367d6; stroke-width: 2 }
line.link.relay { stroke-dasharray: 6 4; stroke: #e37400 } line.link.none { stroke: #ccc }
.linklabel { font-size: 11px; fill: #555; text-anchor: middle }
table { border-collapse: collapse } td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee }
.mig { margin: 6px 0 14px } .bar { display: flex; height: 18px; width: 720px; border: 1px solid #ccc; background: #fff }
.seg { height: 100%; font-size: 10px; overflow: hidden; white-space: nowrap; color: #fff; padding-left: 2px; box-sizing: border-box }
.s-setup { background: #9aa0a6 } .s-bulk { background: #4285f4 } .s-precopy { background: #7baaf7 }
.s-switching { background: #fbbc04 } .s-paused { background: #ea4335 } .s-committed { background: #f28b82 }
.s-handover { background: #34a853 } .s-rolling-back { background: #b31412 } .s-other { background: #5f6368 }
.meta { font-size: 12px; color: #444 }
</style></head>
<body>
<h1>mesh <span id="self"></span> <span id="conn">connecting…</span></h1>
<svg id="graph" width="720" height="380" role="img" aria-label="members and links"></svg>
<h2>VMs</h2>
<table><thead><tr><th>VM</th><th>state</th><th>member</th><th>IP</th><th>MAC</th><th>memory</th></tr></thead><tbody id="vms"></tbody></table>
<h2>Migrations</h2><div id="migrations"><p class="meta">none yet</p></div>
<script>
'use strict'
const NS = 'http://www.w3.org/2000/svg'
const $ = (id) => document.getElementById(id)
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c])
const mib = (b) => (b / 1048576).toFixed(1) + ' MiB'
const prevBytes = new Map()
let state = null
const migrations = new Map()

function svg(tag, attrs, text) {
  const el = document.createElementNS(NS, tag)
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v)
  if (text !== undefined) el.textContent = text
  return el
}

function drawGraph() {
  const g = $('graph')
  g.replaceChildren()
  if (state === null) return
  const self = state.self
  const nodes = [{ peer: self.peerId, name: self.name, self: true, state: 'up' }].concat(
    state.links.map((l) => ({ peer: l.peer, name: l.name, self: false, state: l.state, link: l })))
  const vmsBy = new Map(state.members.map((m) => [m.peer, m.vms || []]))
  const cx = 360, cy = 185, r = nodes.length > 1 ? 140 : 0
  const pos = new Map(nodes.map((n, i) => {
    const a = (2 * Math.PI * i) / nodes.length - Math.PI / 2
    return [n.peer, { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a) }]
  }))
  const now = state.at
  for (const n of nodes) {
    if (n.self) continue
    const a = pos.get(self.peerId), b = pos.get(n.peer), l = n.link
    const cls = 'link ' + (l.link !== 'open' ? 'none' : l.path.startsWith('relay') ? 'relay' : '')
    g.append(svg('line', { x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: cls, 'data-link': n.name }))
    let rate = ''
    const bytes = (l.txBytes || 0) + (l.rxBytes || 0)
    const prev = prevBytes.get(n.peer)
    if (prev !== undefined && now > prev.at) rate = ' · ' + (((bytes - prev.bytes) / ((now - prev.at) / 1000)) / 1e6).toFixed(2) + ' MB/s'
    prevBytes.set(n.peer, { bytes, at: now })
    const label = l.link === 'open' ? l.path + (l.rttMs !== undefined ? ' · ' + l.rttMs.toFixed(1) + ' ms' : '') + rate : l.link
    // Near the peer's end, so that labels of neighbouring links do not overlap at the centre.
    g.append(svg('text', { x: a.x + 0.62 * (b.x - a.x), y: a.y + 0.62 * (b.y - a.y) - 6, class: 'linklabel' }, label))
  }
  for (const n of nodes) {
    const p = pos.get(n.peer)
    const grp = svg('g', { class: 'member' + (n.self ? ' self' : '') + (n.state !== 'up' ? ' down' : ''), 'data-member': n.name })
    grp.append(svg('circle', { cx: p.x, cy: p.y, r: 30 }))
    grp.append(svg('text', { x: p.x, y: p.y + 4 }, n.name))
    ;(vmsBy.get(n.peer) || []).forEach((v, i) => {
      grp.append(svg('text', { x: p.x, y: p.y + 46 + 13 * i, class: 'vmchip', 'data-vm': v.name, 'data-on': n.name }, '▣ ' + v.name + ' (' + v.status + ')'))
    })
    g.append(grp)
  }
}

function drawVms() {
  const rows = []
  for (const m of (state ? state.members : [])) {
    if (m.error) { rows.push('<tr><td colspan="6" class="meta">' + esc(m.member) + ': no answer (' + esc(m.error) + ')</td></tr>'); continue }
    for (const v of m.vms) rows.push('<tr data-vm-row="' + esc(v.name) + '" data-on="' + esc(m.member) + '"><td>' + esc(v.name) + '</td><td>' + esc(v.status) + '</td><td>' + esc(m.member) + (m.self ? ' (this node)' : '') + '</td><td>' + esc(v.ip || '-') + '</td><td>' + esc(v.mac || '-') + '</td><td>' + (v.memoryMiB || '?') + ' MiB</td></tr>')
  }
  $('vms').innerHTML = rows.join('') || '<tr><td colspan="6" class="meta">no VMs</td></tr>'
}

function drawMigrations() {
  const list = [...migrations.values()].sort((a, b) => b.startedAt - a.startedAt)
  if (list.length === 0) return
  const now = Date.now()
  $('migrations').innerHTML = list.map((t) => {
    const end = t.endedAt || now
    const total = Math.max(1, end - t.startedAt)
    const segs = t.phases.map((p, i) => {
      const until = i + 1 < t.phases.length ? t.phases[i + 1].at : end
      const w = Math.max(0.5, (100 * (until - p.at)) / total)
      const known = ['setup', 'bulk', 'precopy', 'switching', 'paused', 'committed', 'handover', 'rolling-back'].includes(p.state)
      return '<div class="seg s-' + (known ? p.state : 'other') + '" style="width:' + w + '%" title="' + esc(p.state) + ' ' + (until - p.at) + ' ms">' + esc(p.state) + '</div>'
    }).join('')
    const peer = (state && state.links.find((l) => l.peer === t.peer)) || { name: t.peer.slice(0, 12) }
    const pr = t.progress, rep = t.report
    const paused = t.phases.find((p) => p.state === 'paused')
    const pauseMs = paused ? (t.phases[t.phases.indexOf(paused) + 1] || { at: end }).at - paused.at : undefined
    const facts = [
      (t.direction === 'out' ? 'to ' : 'from ') + esc(peer.name),
      'state <b data-state>' + esc(t.state) + '</b>',
      ((end - t.startedAt) / 1000).toFixed(1) + ' s',
      pr ? 'round ' + pr.round + ', ' + mib(pr.wireBytes) + ' on the wire, ' + (pr.rateBytesPerSec / 1e6).toFixed(1) + ' MB/s' : '',
      pauseMs !== undefined ? 'paused ' + pauseMs + ' ms' : '',
      rep ? 'done: ' + Math.round(rep.totalMs) + ' ms, downtime ' + Math.round(rep.downtimeMs) + ' ms, ' + mib(rep.wireBytes) + ', ' + rep.rounds + ' rounds (' + esc(rep.switchReason) + ')' : '',
    ].filter(Boolean).join(' · ')
    return '<div class="mig" data-migration="' + esc(t.vm) + '" data-direction="' + t.direction + '" data-state="' + esc(t.state) + '"><div><b>' + esc(t.vm) + '</b> <span class="meta">' + facts + '</span></div><div class="bar">' + segs + '</div></div>'
  }).join('')
}

function render() { drawGraph(); drawVms(); drawMigrations() }

function connect() {
  const es = new EventSource('/api/events')
  es.addEventListener('open', () => { $('conn').textContent = 'live' })
  es.addEventListener('error', () => { $('conn').textContent = 'reconnecting…' })
  es.addEventListener('state', (e) => {
    state = JSON.parse(e.data)
    $('self').textContent = '· ' + state.self.name
    for (const t of state.migrations) migrations.set(t.id, t)
    render()
  })
  es.addEventListener('migration', (e) => { const t = JSON.parse(e.data); migrations.set(t.id, t); drawMigrations() })
}
connect()
setInterval(drawMigrations, 500)
</script></body></html>
`
