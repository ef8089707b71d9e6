// microscaler dashboard: plain JavaScript, no dependencies. Loads the history once, then
// follows the live stream (server-sent events, one `tick` per tick) without reloading.
'use strict';

const API = '/api/v1';
const COLORS = ['--p1', '--p2', '--p3', '--p4', '--p5'].map(
  (v) => getComputedStyle(document.documentElement).getPropertyValue(v).trim());
const css = (v) => getComputedStyle(document.documentElement).getPropertyValue(v).trim();

const state = {
  status: null,
  services: [],      // from /api/v1/services, configuration order
  order: [],         // service names, priority then name
  points: [],        // history points, oldest first
  latest: null,      // latest tick
  decisions: [],     // newest first
  ticks: 0,          // ticks received on the live stream
  rangeS: 300,
};
window.microscaler = state; // for the browser test and the curious

const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// The token arrives in the URL fragment (#token=...), which browsers never send to a server.
(function takeToken() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    localStorage.setItem('microscaler-token', decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
})();
function token() { return localStorage.getItem('microscaler-token') || ''; }

async function getJSON(path) {
  const r = await fetch(path, { headers: token() ? { Authorization: 'Bearer ' + token() } : {} });
  if (!r.ok) throw new Error(path + ': ' + r.status);
  return r.json();
}

async function send(method, path, body) {
  const headers = { Authorization: 'Bearer ' + token() };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || (method + ' ' + path + ': ' + r.status));
  return data;
}

function colorOf(name) {
  const i = state.order.indexOf(name);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}

function fmt(n) { return n === null || n === undefined ? '–' : (Number.isInteger(n) ? String(n) : n.toFixed(1)); }
function hhmmss(ts) { return new Date(ts).toLocaleTimeString([], { hour12: false }); }

// ---------- now: bars and slots ----------
function renderNow() {
  const t = state.latest;
  const bars = $('bars');
  bars.textContent = '';
  if (!t) return;
  $('clock').textContent = hhmmss(t.ts);
  const cap = Math.max(t.capacity, 1);
  for (const s of t.services) {
    const row = el('div', 'bar-row');
    row.dataset.service = s.name;
    row.append(el('span', 'name', s.name + ' · P' + s.priority));
    const track = el('div', 'bar-track');
    const run = el('div', 'run');
    run.style.width = (100 * Math.min(s.running, cap) / cap) + '%';
    run.style.background = colorOf(s.name);
    track.append(run);
    if (s.demand !== null && !s.remainder) {
      const d = el('div', 'demand');
      d.style.left = 'calc(' + (100 * Math.min(s.demand, cap) / cap) + '% - 1px)';
      d.title = 'demand ' + fmt(s.demand);
      track.append(d);
    }
    row.append(track);
    const num = el('span', 'num');
    num.textContent = s.running + (s.demand !== null && !s.remainder ? ' / ' + fmt(s.demand) : '');
    num.title = 'running / demand';
    row.append(num);
    bars.append(row);
  }
  // One cell per slot, coloured by the service whose replica runs in it.
  const slots = $('slots');
  slots.textContent = '';
  const cells = [];
  for (const s of t.services) for (let i = 0; i < s.running; i++) cells.push(colorOf(s.name));
  for (let i = 0; i < Math.max(t.capacity, cells.length); i++) {
    const c = el('div', 'slot');
    if (i < cells.length) { c.style.background = cells[i]; c.style.borderColor = cells[i]; }
    slots.append(c);
  }
  const legend = $('legend');
  legend.textContent = '';
  for (const s of t.services) {
    const l = el('span');
    const sw = el('i', 'sw');
    sw.style.background = colorOf(s.name);
    l.append(sw, document.createTextNode(s.name + ' ' + s.running + ' running, target ' + s.target + ' (' + s.bound + ')'));
    legend.append(l);
  }
  const free = el('span', null, t.free + ' free of ' + t.capacity);
  legend.append(free);

  // The seeds' success rule, for triggered services and one remainder.
  const trig = t.services.filter((s) => !s.remainder && s.demand !== null);
  const ok = trig.every((s) => s.running === Math.min(Math.ceil(s.demand), t.capacity))
    && t.services.reduce((a, s) => a + s.running, 0) === t.capacity;
  const sb = $('success');
  sb.hidden = false;
  sb.textContent = ok ? 'demand met, capacity full' : 'converging';
  sb.className = 'pill' + (ok ? '' : ' off');
  document.body.dataset.ticks = String(state.ticks);
  const p1 = t.services[0];
  if (p1) {
    document.body.dataset.demand = fmt(p1.demand);
    document.body.dataset.running = String(p1.running);
  }
}

// ---------- history chart ----------
function pointOf(t) {
  const services = {};
  for (const s of t.services) services[s.name] = { demand: s.demand === null ? undefined : s.demand, running: s.running, pending: s.pending, desired: s.target };
  return { ts: t.ts, capacity: t.capacity, services };
}

function drawChart() {
  const c = $('chart');
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
  }
  const g = c.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const now = state.latest ? state.latest.ts : Date.now();
  const from = now - state.rangeS * 1000;
  const pts = state.points.filter((p) => p.ts >= from);
  c.dataset.points = String(pts.length);
  const L = 30, R = 8, T = 8, B = 22;
  let ymax = 1;
  for (const p of pts) {
    ymax = Math.max(ymax, p.capacity);
    for (const n in p.services) ymax = Math.max(ymax, p.services[n].demand || 0);
  }
  ymax = Math.ceil(ymax + 1);
  const x = (ts) => L + (w - L - R) * (ts - from) / (now - from || 1);
  const y = (v) => h - B - (h - T - B) * v / ymax;
  // Grid and labels.
  g.font = '11px system-ui, sans-serif';
  g.fillStyle = css('--muted');
  g.strokeStyle = css('--line');
  g.lineWidth = 1;
  const ystep = ymax > 20 ? Math.ceil(ymax / 10) : (ymax > 10 ? 2 : 1);
  for (let v = 0; v <= ymax; v += ystep) {
    g.beginPath(); g.moveTo(L, y(v) + .5); g.lineTo(w - R, y(v) + .5); g.stroke();
    g.fillText(String(v), 4, y(v) + 4);
  }
  const xstep = state.rangeS <= 300 ? 60e3 : (state.rangeS <= 1800 ? 300e3 : 600e3);
  for (let ts = Math.ceil(from / xstep) * xstep; ts <= now; ts += xstep) {
    g.fillText(hhmmss(ts).slice(0, 5), x(ts) - 14, h - 6);
  }
  if (pts.length < 2) return;
  // Stacked areas of running replicas, highest priority at the bottom (step lines: counts
  // change at ticks).
  const base = pts.map(() => 0);
  for (const name of state.order) {
    const top = pts.map((p, i) => base[i] + ((p.services[name] || {}).running || 0));
    g.beginPath();
    g.moveTo(x(pts[0].ts), y(base[0]));
    for (let i = 0; i < pts.length; i++) {
      if (i > 0) g.lineTo(x(pts[i].ts), y(top[i - 1]));
      g.lineTo(x(pts[i].ts), y(top[i]));
    }
    for (let i = pts.length - 1; i >= 0; i--) {
      g.lineTo(x(pts[i].ts), y(base[i]));
      if (i > 0) g.lineTo(x(pts[i].ts), y(base[i - 1]));
    }
    g.closePath();
    g.fillStyle = colorOf(name);
    g.fill();
    for (let i = 0; i < pts.length; i++) base[i] = top[i];
  }
  // Capacity, dashed.
  g.setLineDash([6, 4]);
  g.strokeStyle = css('--capacity');
  g.lineWidth = 1.5;
  stepLine(g, pts, x, y, (p) => p.capacity);
  g.setLineDash([]);
  // Demand of each triggered service, red.
  g.strokeStyle = css('--demand');
  g.lineWidth = 2.5;
  for (const s of state.services.filter((s) => s.kind === 'triggered')) {
    stepLine(g, pts, x, y, (p) => (p.services[s.name] || {}).demand);
  }
}

function stepLine(g, pts, x, y, val) {
  g.beginPath();
  let started = false, prev = null;
  for (const p of pts) {
    const v = val(p);
    if (v === undefined || v === null) { started = false; prev = null; continue; }
    if (!started) { g.moveTo(x(p.ts), y(v)); started = true; } else { g.lineTo(x(p.ts), y(prev)); g.lineTo(x(p.ts), y(v)); }
    prev = v;
  }
  g.stroke();
}

// ---------- hosts ----------
function renderHosts() {
  const t = state.latest;
  const box = $('hosts');
  box.textContent = '';
  if (!t) return;
  if (t.hosts.length === 0) box.append(el('div', 'muted', 'no hosts observed'));
  for (const h of t.hosts) {
    const card = el('div', 'host');
    card.append(el('div', 'hname', h.name + (h.ready ? '' : ' (not ready)')));
    const reps = el('div', 'replicas');
    const counts = [];
    for (const name of state.order) {
      const rp = h.services[name];
      if (!rp) continue;
      for (let i = 0; i < rp[0] + rp[1]; i++) {
        const r = el('i', 'rep' + (i >= rp[0] ? ' pending' : ''));
        r.style.background = colorOf(name);
        r.title = name + (i >= rp[0] ? ' (pending)' : '');
        reps.append(r);
      }
      counts.push(name + ' ' + rp[0] + (rp[1] ? ' (+' + rp[1] + ' pending)' : ''));
    }
    card.append(reps, el('div', 'counts', counts.join(' · ') || 'no replicas'));
    const bars = resourceBars(h);
    if (bars) card.append(bars);
    box.append(card);
  }
}

// A number of CPUs or bytes, for people.
function cpus(v) { return (Math.round(v * 1000) / 1000) + ' CPU'; }
function bytes(v) {
  const gib = v / 1073741824;
  return gib >= 1 ? (Math.round(gib * 100) / 100) + ' GiB' : Math.round(v / 1048576) + ' MiB';
}

// What a host's replicas take of its CPU and memory, by service, when services ask for
// resources and the backend reports the host's room.
function resourceBars(h) {
  const sized = new Map(state.services.filter((s) => s.resources).map((s) => [s.name, s.resources]));
  if (sized.size === 0) return null;
  const box = el('div', 'res');
  for (const [dim, total, show] of [['cpu', h.cpus, cpus], ['memory', h.memory_bytes, bytes]]) {
    if (total === null || total === undefined) continue;
    const bar = el('div', 'rbar');
    bar.dataset.dim = dim;
    let used = 0;
    for (const name of state.order) {
      const r = sized.get(name);
      const rp = h.services[name];
      if (!r || !rp) continue;
      const v = (rp[0] + rp[1]) * r[dim];
      used += v;
      const seg = el('i');
      seg.style.width = (total > 0 ? Math.min(100, (100 * v) / total) : 0) + '%';
      seg.style.background = colorOf(name);
      seg.title = name + ': ' + show(v);
      bar.append(seg);
    }
    box.append(el('div', 'rlabel', dim + ' ' + show(used) + ' of ' + show(total)), bar);
  }
  return box;
}

// ---------- decisions ----------
function renderDecisions() {
  const ol = $('decisions');
  ol.textContent = '';
  if (state.decisions.length === 0) ol.append(el('li', 'muted', 'no decisions yet'));
  for (const d of state.decisions.slice(0, 100)) {
    const li = el('li');
    li.append(el('span', 't', hhmmss(d.ts)), el('span', 'b ' + d.kind, d.kind + ' · ' + d.bound), el('span', 'r', d.reason));
    ol.append(li);
  }
}

// ---------- controls ----------
function msg(text, bad) {
  const m = $('control-msg');
  m.textContent = text;
  m.className = bad ? 'muted err' : 'muted';
}

async function act(method, path, body) {
  try {
    const s = await send(method, path, body);
    const i = state.services.findIndex((x) => x.name === s.name);
    if (i >= 0) state.services[i] = s;
    renderControls();
    msg('done: ' + method + ' ' + path.replace(API, ''));
  } catch (e) {
    msg(e.message, true);
  }
}

function numberInput(value, min, step, label) {
  const i = el('input');
  i.type = 'number'; i.min = String(min); i.step = String(step); i.value = String(value);
  i.setAttribute('aria-label', label);
  return i;
}

function renderControls() {
  const box = $('controls');
  box.textContent = '';
  for (const s of state.services) {
    const div = el('div', 'svc');
    div.dataset.service = s.name;
    const head = el('div', 'row');
    const sw = el('i', 'sw'); sw.style.background = colorOf(s.name);
    head.append(sw, el('span', 'title', s.name), el('span', 'muted', 'P' + s.priority + ' · ' + s.kind + (s.paused ? ' · paused' : '')));
    const pb = el('button', 'secondary pause', s.paused ? 'resume' : 'pause');
    pb.addEventListener('click', () => act('POST', API + '/services/' + encodeURIComponent(s.name) + (s.paused ? '/resume' : '/pause')));
    head.append(pb);
    div.append(head);
    if (s.random) {
      const row = el('div', 'row');
      const d = numberInput(s.random.delta, 0, 1, 'delta');
      d.className = 'delta';
      const iv = numberInput(s.random.interval_ms / 1000, 0.1, 0.1, 'interval in seconds');
      iv.className = 'interval';
      const b = el('button', 'apply-random', 'apply');
      b.addEventListener('click', () => act('PUT', API + '/services/' + encodeURIComponent(s.name) + '/random',
        { delta: Number(d.value), interval_ms: Math.round(Number(iv.value) * 1000) }));
      row.append(el('span', 'muted', 'random ±'), d, el('span', 'muted', 'every'), iv, el('span', 'muted', 's'), b);
      div.append(row);
    }
    if (s.manual !== null && s.manual !== undefined) {
      const row = el('div', 'row');
      const v = numberInput(s.manual, 0, 1, 'manual demand');
      v.className = 'manual';
      const b = el('button', 'set-manual', 'set');
      b.addEventListener('click', () => act('PUT', API + '/services/' + encodeURIComponent(s.name) + '/demand', { value: Number(v.value) }));
      // The manual demand overrides the random walk (held at it) until cleared.
      const c = el('button', 'clear-manual', 'clear');
      c.addEventListener('click', () => act('POST', API + '/services/' + encodeURIComponent(s.name) + '/demand/clear'));
      row.append(el('span', 'muted', 'manual demand'), v, b, c);
      if (s.override) row.append(el('span', 'muted override', 'overrides the random walk'));
      div.append(row);
    }
    box.append(div);
  }
  const t = $('token');
  if (document.activeElement !== t) t.value = token();
}

// ---------- wiring ----------
function onTick(t) {
  state.ticks++;
  state.latest = t;
  if (t.capacity > 0) state.points.push(pointOf(t));
  const keep = t.ts - 3600e3;
  while (state.points.length && state.points[0].ts < keep) state.points.shift();
  if (t.decisions.length) {
    state.decisions = t.decisions.slice().reverse().concat(state.decisions).slice(0, 200);
    renderDecisions();
  }
  // Pause state follows the loop, whoever changed it.
  let changed = false;
  for (const s of state.services) {
    const p = t.paused.includes(s.name);
    if (p !== s.paused) { s.paused = p; changed = true; }
  }
  if (changed) renderControls();
  renderNow();
  renderHosts();
  scheduleDraw();
}

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; drawChart(); });
}

function connect() {
  const live = $('live');
  const q = token() ? '?access_token=' + encodeURIComponent(token()) : '';
  const es = new EventSource(API + '/stream' + q);
  es.addEventListener('tick', (e) => {
    live.textContent = 'live'; live.className = 'pill';
    onTick(JSON.parse(e.data));
  });
  es.onerror = () => { live.textContent = 'reconnecting'; live.className = 'pill bad'; };
}

async function loadHistory() {
  const to = Date.now();
  const h = await getJSON(API + '/history?from=' + (to - state.rangeS * 1000) + '&to=' + to + '&limit=2000');
  const newest = state.points.length ? state.points[0].ts : Infinity;
  state.points = h.points.filter((p) => p.ts < newest).concat(state.points);
}

async function start() {
  try {
    state.status = await getJSON(API + '/status');
    state.services = await getJSON(API + '/services');
    state.order = state.services.slice().sort((a, b) => (a.kind === 'remainder') - (b.kind === 'remainder') || a.priority - b.priority || (a.name < b.name ? -1 : 1)).map((s) => s.name);
    $('where').textContent = state.status.instance + ' on ' + state.status.backend + ' · tick ' + state.status.tick_ms + ' ms';
    $('chart-legend').textContent = '';
    for (const name of state.order) {
      const l = el('span'); const sw = el('i', 'sw'); sw.style.background = colorOf(name);
      l.append(sw, document.createTextNode(name + ' running'));
      $('chart-legend').append(l);
    }
    renderControls();
    await loadHistory();
    const d = await getJSON(API + '/decisions?limit=100');
    state.decisions = d.decisions;
    renderDecisions();
  } catch (e) {
    msg('cannot load: ' + e.message, true);
  }
  connect();
  scheduleDraw();
}

$('range').addEventListener('change', async (e) => {
  state.rangeS = Number(e.target.value);
  await loadHistory().catch(() => {});
  scheduleDraw();
});
$('token').addEventListener('change', (e) => { localStorage.setItem('microscaler-token', e.target.value.trim()); });
window.addEventListener('resize', scheduleDraw);
start();
