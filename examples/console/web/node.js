// The node view: this node's models, plugins and usage, from the admin API and /metrics,
// refreshed every two seconds while it is open. Rows are updated in place, so a refresh
// never takes the keyboard focus away.
import { authHeaders, errorOf, getJSON, hasKey, postAdmin } from './http.js';

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 2000;
const HISTORY_POINTS = 150; // five minutes of refreshes

const node = {
  timer: null,
  busy: false,
  again: false,
  last: null, // previous scrape: {t, models: {name: {gen, stepSum, stepCount}}}
  series: {}, // model -> {rate: [], step: []}
  rows: { models: new Map(), plugins: new Map(), usage: new Map() },
};

/** Prometheus text: name -> [{labels, value}]. */
function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[3] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value: Number(m[4]) });
  }
  return out;
}

function sum(metrics, name, keep) {
  return (metrics.get(name) ?? []).filter((s) => keep(s.labels)).reduce((total, s) => total + s.value, 0);
}

function push(list, value) {
  list.push(value);
  if (list.length > HISTORY_POINTS) list.shift();
}

function sparkline(cell, values, unit) {
  let wrap = cell.querySelector('.spark');
  if (!wrap) {
    wrap = document.createElement('span');
    wrap.className = 'spark';
    wrap.innerHTML = '<svg viewBox="0 0 96 24" role="img" preserveAspectRatio="none"><polyline points=""/></svg><span class="value"></span>';
    cell.append(wrap);
  }
  const max = Math.max(1e-9, ...values);
  const step = values.length > 1 ? 96 / (values.length - 1) : 0;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(23 - (v / max) * 22).toFixed(1)}`).join(' ');
  wrap.querySelector('polyline').setAttribute('points', points);
  const latest = values.length ? values[values.length - 1] : null;
  const label = latest === null ? '–' : `${latest.toFixed(1)} ${unit}`;
  wrap.querySelector('.value').textContent = label;
  wrap.querySelector('svg').setAttribute('aria-label', `last five minutes, now ${label}`);
}

/** The row of `key` in `table`, created with `columns` cells the first time. */
function row(table, key, columns) {
  const rows = node.rows[table];
  let tr = rows.get(key);
  if (!tr) {
    tr = document.createElement('tr');
    tr.dataset.key = key;
    for (let i = 0; i < columns; i += 1) tr.append(document.createElement(i === 0 ? 'th' : 'td'));
    tr.firstChild.scope = 'row';
    $(table).tBodies[0].append(tr);
    rows.set(key, tr);
  }
  return tr;
}

function prune(table, keep) {
  for (const [key, tr] of node.rows[table]) {
    if (!keep.has(key)) {
      tr.remove();
      node.rows[table].delete(key);
    }
  }
}

function setText(cell, text, className) {
  if (cell.textContent !== text) cell.textContent = text;
  if (className !== undefined && cell.className !== className) cell.className = className;
}

function button(cell, action, label, onClick) {
  let b = cell.querySelector(`button[data-action="${action}"]`);
  if (!b) {
    b = document.createElement('button');
    b.type = 'button';
    b.dataset.action = action;
    b.addEventListener('click', onClick);
    cell.append(b);
  }
  b.textContent = label;
  return b;
}

function showError(message) {
  $('node-error').textContent = message;
  $('node-error').hidden = !message;
}

async function modelAction(name, action) {
  try {
    await postAdmin(`/admin/models/${encodeURIComponent(name)}/${action}`);
    showError('');
  } catch (e) {
    showError(`${name}: ${e.message}`);
  }
  refreshNode();
}

function renderModels(models, metrics, now) {
  const current = {};
  const keep = new Set();
  for (const m of models) {
    keep.add(m.name);
    const ofModel = (l) => l.model === m.name;
    const gen = sum(metrics, 'flywheel_generated_tokens_total', ofModel);
    const stepSum = sum(metrics, 'flywheel_batch_duration_seconds_sum', ofModel);
    const stepCount = sum(metrics, 'flywheel_batch_duration_seconds_count', ofModel);
    current[m.name] = { gen, stepSum, stepCount };
    const series = (node.series[m.name] ??= { rate: [], step: [] });
    const before = node.last?.models[m.name];
    if (before) {
      const dt = (now - node.last.t) / 1000;
      push(series.rate, dt > 0 ? Math.max(0, gen - before.gen) / dt : 0);
      const steps = stepCount - before.stepCount;
      push(series.step, steps > 0 ? ((stepSum - before.stepSum) / steps) * 1000 : 0);
    }
    const tr = row('models', m.name, 8);
    const [name, state, seqs, kv, rate, step, keepAlive, actions] = tr.children;
    setText(name, m.name);
    setText(state, m.state + (m.pinned ? ' · pinned' : ''), `state-${m.state}`);
    setText(seqs, `${m.active_sequences} / ${m.max_sequences}`, 'num');
    setText(kv, String(m.kv_tokens), 'num');
    sparkline(rate, series.rate, 'tok/s');
    sparkline(step, series.step, 'ms');
    setText(keepAlive, m.keep_alive);
    // The buttons sit in a box of their own: a table cell stays a table cell.
    let box = actions.querySelector('.actions-cell');
    if (!box) {
      box = document.createElement('div');
      box.className = 'actions-cell';
      actions.append(box);
    }
    const loaded = m.state === 'loaded';
    button(box, 'load', 'Load', () => modelAction(m.name, 'load')).disabled = loaded;
    button(box, 'unload', 'Unload', () => modelAction(m.name, 'unload')).disabled = !loaded;
    const pin = button(box, 'pin', m.pinned ? 'Unpin' : 'Pin', () =>
      modelAction(m.name, pin.textContent === 'Pin' ? 'pin' : 'unpin'));
    for (const b of box.querySelectorAll('button')) b.setAttribute('aria-label', `${b.textContent} ${m.name}`);
  }
  prune('models', keep);
  node.last = { t: now, models: current };
}

async function loadVersions(name, select) {
  try {
    const { live, versions } = await getJSON(`/admin/plugins/${encodeURIComponent(name)}/versions`, 'admin');
    const options = versions
      .slice()
      .reverse()
      .map((v) => new Option(`v${v.version}${v.version === live ? ' (live)' : ''} · ${v.deployed_by}`, String(v.version)));
    select.replaceChildren(...options);
  } catch {
    select.replaceChildren(new Option('no versions', ''));
  }
}

async function rollback(name, select) {
  const version = Number(select.value);
  if (!version) return;
  try {
    await postAdmin(`/admin/plugins/${encodeURIComponent(name)}/rollback`, { version });
    showError('');
  } catch (e) {
    showError(`${name}: ${e.message}`);
  }
  await loadVersions(name, select);
  refreshNode();
}

function renderPlugins(plugins, failed, metrics) {
  const keep = new Set();
  for (const p of plugins) {
    keep.add(p.name);
    const tr = row('plugins', p.name, 8);
    const [name, version, routes, limits, inFlight, errors, traps, back] = tr.children;
    setText(name, p.name);
    setText(version, p.version ? `v${p.version.version}` : '–');
    setText(routes, p.routes.join(' '));
    const l = p.limits;
    setText(limits, `${l.memory_limit_mb} MiB · ${l.deadline_ms / 1000} s · ${l.max_concurrency} at once`);
    setText(inFlight, String(p.in_flight), 'num');
    const serverErrors = sum(metrics, 'flywheel_http_requests_total', (x) => x.plugin === p.name && Number(x.status) >= 500);
    setText(errors, String(serverErrors), 'num');
    const byKind = (metrics.get('flywheel_guest_traps_total') ?? []).filter((s) => s.labels.plugin === p.name && s.value > 0);
    setText(traps, byKind.length ? byKind.map((s) => `${s.labels.kind} ${s.value}`).join(', ') : '0');
    let select = back.querySelector('select');
    if (!select) {
      back.className = 'rollback';
      select = document.createElement('select');
      select.setAttribute('aria-label', `Version of ${p.name} to roll back to`);
      select.append(new Option('…', ''));
      back.append(select);
      loadVersions(p.name, select);
      button(back, 'rollback', 'Roll back', () => rollback(p.name, select)).setAttribute('aria-label', `Roll back ${p.name}`);
    }
  }
  prune('plugins', keep);
  const failedText = failed.map((f) => `${f.name}: ${f.error}`).join('\n');
  $('failed-plugins').textContent = failedText ? `Plugins that failed to load:\n${failedText}` : '';
  $('failed-plugins').hidden = !failedText;
}

function renderUsage(report) {
  const keep = new Set();
  for (const r of report.rows) {
    const key = `${r.key}\u0000${r.plugin}`;
    keep.add(key);
    const tr = row('usage', key, 8);
    const [k, plugin, requests, refused, prompt, generated, cpu, stops] = tr.children;
    setText(k, r.key);
    setText(plugin, r.plugin);
    setText(requests, String(r.requests), 'num');
    setText(refused, String(r.rejected_requests), 'num');
    setText(prompt, String(r.prompt_tokens), 'num');
    setText(generated, String(r.generated_tokens), 'num');
    setText(cpu, `${r.guest_cpu_seconds.toFixed(3)} s`, 'num');
    setText(stops, String(r.quota_stops), 'num');
  }
  prune('usage', keep);
}

/** Fetch and show everything now, then every two seconds while the view is open. */
export async function refreshNode() {
  clearTimeout(node.timer);
  if (node.busy) {
    // One refresh at a time: the rates are computed between two consecutive ones.
    node.again = true;
    return;
  }
  if ($('view-node').hidden || !hasKey('admin')) return;
  node.busy = true;
  try {
    const since = Math.floor(Date.now() / 1000) - 3600;
    const [models, plugins, usage, metricsText] = await Promise.all([
      getJSON('/admin/models', 'admin'),
      getJSON('/admin/plugins', 'admin'),
      getJSON(`/admin/usage?since=${since}`, 'admin'),
      fetch('/metrics').then((r) => r.text()),
    ]);
    const metrics = parseMetrics(metricsText);
    renderModels(models.models, metrics, performance.now());
    renderPlugins(plugins.plugins, plugins.failed, metrics);
    renderUsage(usage);
    $('node-updated').textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    showError(`Refresh failed: ${e.message}`);
  } finally {
    node.busy = false;
  }
  if (node.again) {
    node.again = false;
    refreshNode();
  } else {
    node.timer = setTimeout(refreshNode, REFRESH_MS);
  }
}

async function deploy(event) {
  event.preventDefault();
  const name = $('deploy-name').value.trim();
  const wasm = $('deploy-wasm').files[0];
  if (!name || !wasm) return;
  const form = new FormData();
  form.append('component', wasm, wasm.name);
  const manifest = $('deploy-manifest').files[0];
  if (manifest) form.append('manifest', await manifest.text());
  const by = $('deploy-by').value.trim();
  if (by) form.append('deployed_by', by);
  $('deploy-result').textContent = 'Deploying…';
  try {
    const resp = await fetch(`/admin/plugins/${encodeURIComponent(name)}`, { method: 'PUT', headers: authHeaders('admin'), body: form });
    if (!resp.ok) throw await errorOf(resp);
    const deployed = await resp.json();
    $('deploy-result').textContent = `Deployed ${name} v${deployed.version?.version ?? '?'}`;
    // Its row is rebuilt, with the new version in its rollback list.
    node.rows.plugins.get(name)?.remove();
    node.rows.plugins.delete(name);
  } catch (e) {
    $('deploy-result').textContent = `Refused: ${e.message}`;
  }
  refreshNode();
}

export function startNode() {
  $('deploy').addEventListener('submit', deploy);
}
