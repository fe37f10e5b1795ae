// Flywheel console: a playground that streams from the OpenAI API (or a `complete`-protocol
// plugin), and a view of this node read from the admin API and /metrics. No framework, no
// network beyond this host. Keys stay in sessionStorage: this tab only, gone when it closes.
'use strict';

const $ = (id) => document.getElementById(id);
const KEYS = { admin: 'flywheel.adminKey', api: 'flywheel.apiKey' };
const REFRESH_MS = 2000;
const HISTORY_POINTS = 150; // five minutes of refreshes

// ---------------------------------------------------------------- HTTP

function authHeaders(kind, extra = {}) {
  const key = sessionStorage.getItem(kind === 'admin' ? KEYS.admin : KEYS.api);
  return key ? { ...extra, authorization: `Bearer ${key}` } : { ...extra };
}

async function errorOf(resp) {
  const body = await resp.json().catch(() => null);
  return new Error(body?.error?.message ?? `HTTP ${resp.status}`);
}

async function getJSON(path, kind) {
  const resp = await fetch(path, { headers: authHeaders(kind) });
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

async function postAdmin(path, body) {
  const init = { method: 'POST', headers: authHeaders('admin') };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

// ---------------------------------------------------------------- views

function show(view) {
  for (const [tab, section] of [['tab-play', 'view-play'], ['tab-node', 'view-node']]) {
    const on = section === view;
    $(tab).setAttribute('aria-pressed', String(on));
    $(section).hidden = !on;
  }
  history.replaceState(null, '', view === 'view-node' ? '#node' : '#play');
  if (view === 'view-node') refreshNode();
}

// ---------------------------------------------------------------- sign in

function signedIn() {
  return Boolean(sessionStorage.getItem(KEYS.admin));
}

function renderLogin(message = '') {
  const on = signedIn();
  document.querySelector('label[for="admin-key"]').hidden = on;
  $('admin-key').hidden = on;
  $('login-button').hidden = on;
  $('logout-button').hidden = !on;
  $('login-state').textContent = message || (on ? 'Signed in' : '');
  $('node-login').hidden = on;
  $('node').hidden = !on;
}

async function signIn(event) {
  event.preventDefault();
  const key = $('admin-key').value.trim();
  if (!key) return;
  sessionStorage.setItem(KEYS.admin, key);
  try {
    await getJSON('/admin/models', 'admin');
    $('admin-key').value = '';
    renderLogin();
    await loadEndpoints();
    refreshNode();
  } catch (e) {
    sessionStorage.removeItem(KEYS.admin);
    renderLogin(`Not signed in: ${e.message}`);
  }
}

function signOut() {
  sessionStorage.removeItem(KEYS.admin);
  renderLogin();
  loadEndpoints();
}

// ---------------------------------------------------------------- playground

const play = {
  endpoints: [],
  history: [], // chat turns: {role, content}
  abort: null,
};

const BASE_ENDPOINTS = [
  { id: 'chat', label: 'Chat · /v1/chat/completions', path: '/v1/chat/completions', kind: 'chat' },
  { id: 'completions', label: 'Completion · /v1/completions', path: '/v1/completions', kind: 'completions' },
];

async function loadEndpoints() {
  const endpoints = [...BASE_ENDPOINTS];
  if (signedIn()) {
    try {
      const { plugins } = await getJSON('/admin/plugins', 'admin');
      for (const p of plugins) {
        if (p.name === 'openai' || p.name === 'console') continue;
        endpoints.push({ id: `fn-${p.name}`, label: `${p.name} · /fn/${p.name}`, path: `/fn/${p.name}`, kind: 'complete' });
      }
    } catch {
      // The base endpoints still work.
    }
  } else {
    endpoints.push({ id: 'fn-complete', label: 'complete · /fn/complete', path: '/fn/complete', kind: 'complete' });
  }
  play.endpoints = endpoints;
  const select = $('endpoint');
  const chosen = select.value;
  select.replaceChildren(...endpoints.map((e) => new Option(e.label, e.id)));
  if (endpoints.some((e) => e.id === chosen)) select.value = chosen;
  endpointChanged();
}

async function loadModels() {
  const select = $('model');
  try {
    const { data } = await getJSON('/v1/models', 'api');
    const chosen = select.value;
    select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === chosen)) select.value = chosen;
    showPlayError('');
  } catch (e) {
    showPlayError(`Models: ${e.message}. If the server needs an API key, enter it above.`);
  }
}

function endpoint() {
  return play.endpoints.find((e) => e.id === $('endpoint').value) ?? BASE_ENDPOINTS[0];
}

function endpointChanged() {
  const chat = endpoint().kind === 'chat';
  $('format').disabled = !chat;
  if (!chat) $('format').value = 'text';
  $('system-field').hidden = !chat;
  formatChanged();
}

function formatChanged() {
  $('schema-field').hidden = $('format').value !== 'json_schema';
}

function showPlayError(message) {
  $('play-error').textContent = message;
  $('play-error').hidden = !message;
}

function addMessage(role, text = '') {
  const wrap = document.createElement('div');
  wrap.className = `message ${role}`;
  const label = document.createElement('div');
  label.className = 'role';
  label.textContent = role;
  const body = document.createElement('p');
  body.className = 'text';
  body.textContent = text;
  wrap.append(label, body);
  $('transcript').append(wrap);
  scrollTranscript();
  return { wrap, body };
}

function scrollTranscript() {
  const t = $('transcript');
  t.scrollTop = t.scrollHeight;
}

function requestBody(kind, prompt) {
  const number = (id) => ($(id).value === '' ? undefined : Number($(id).value));
  const common = {
    model: $('model').value || undefined,
    max_tokens: number('max-tokens'),
    temperature: number('temperature'),
    top_p: number('top-p'),
    seed: number('seed'),
    stream: true,
  };
  if (kind === 'complete') return { ...common, prompt };
  const openai = { ...common, stream_options: { include_usage: true } };
  if (kind === 'completions') return { ...openai, prompt };
  const messages = [];
  const system = $('system').value.trim();
  if (system) messages.push({ role: 'system', content: system });
  messages.push(...play.history, { role: 'user', content: prompt });
  const body = { ...openai, messages };
  const format = $('format').value;
  if (format === 'json_object') body.response_format = { type: 'json_object' };
  if (format === 'json_schema') {
    body.response_format = { type: 'json_schema', json_schema: { name: 'console', schema: JSON.parse($('schema').value) } };
  }
  return body;
}

// One answer's live counters.
class Meter {
  constructor() {
    this.started = performance.now();
    this.first = null;
    this.tokens = 0;
    this.render('–');
  }

  piece() {
    const now = performance.now();
    if (this.first === null) this.first = now;
    this.tokens += 1;
    this.render();
  }

  exact(tokens) {
    this.tokens = tokens;
    this.render();
  }

  render(finish) {
    $('stat-ttft').textContent = this.first === null ? '–' : `${Math.round(this.first - this.started)} ms`;
    $('stat-tokens').textContent = String(this.tokens);
    const secs = this.first === null ? 0 : (performance.now() - this.first) / 1000;
    $('stat-rate').textContent = this.tokens > 1 && secs > 0 ? ((this.tokens - 1) / secs).toFixed(1) : '–';
    if (finish !== undefined) $('stat-finish').textContent = finish;
  }
}

// Server-sent events from a fetch body: calls onEvent(type, data) per event.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) type = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) onEvent(type, data.join('\n'));
    }
  }
}

function pieceOf(kind, event) {
  if (kind === 'chat') return event.choices?.[0]?.delta?.content ?? '';
  if (kind === 'completions') return event.choices?.[0]?.text ?? '';
  return event.text ?? '';
}

function finishOf(kind, event) {
  if (kind === 'complete') return event.finish_reason ?? null;
  return event.choices?.[0]?.finish_reason ?? null;
}

async function send(event) {
  event.preventDefault();
  if (play.abort) return;
  const prompt = $('prompt').value;
  if (!prompt.trim()) return;
  const ep = endpoint();
  let body;
  try {
    body = requestBody(ep.kind, prompt);
  } catch (e) {
    showPlayError(`The JSON Schema is not valid JSON: ${e.message}`);
    return;
  }
  showPlayError('');
  addMessage('user', prompt);
  $('prompt').value = '';
  const answer = addMessage('assistant');
  const meter = new Meter();
  $('stat-finish').textContent = 'streaming';
  const controller = new AbortController();
  play.abort = controller;
  $('send').disabled = true;
  $('stop').disabled = false;
  let text = '';
  let finish = null;
  let complete = false;
  try {
    const resp = await fetch(ep.path, {
      method: 'POST',
      headers: authHeaders('api', { 'content-type': 'application/json' }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    await readEvents(resp, (type, data) => {
      if (data === '[DONE]') {
        complete = true;
        return;
      }
      const ev = JSON.parse(data);
      if (type === 'error' || ev.error) throw new Error(ev.error?.message ?? 'the server reported an error');
      const piece = pieceOf(ep.kind, ev);
      if (piece) {
        text += piece;
        answer.body.textContent = text;
        meter.piece();
        scrollTranscript();
      }
      finish = finishOf(ep.kind, ev) ?? finish;
      const usage = ev.usage?.completion_tokens;
      if (Number.isInteger(usage)) meter.exact(usage);
    });
    if (!complete) throw new Error('the stream ended before it was complete');
    meter.render(finish ?? 'done');
  } catch (e) {
    if (e.name === 'AbortError') {
      meter.render('stopped');
    } else {
      meter.render('error');
      answer.wrap.classList.add('error');
      answer.body.textContent = text ? `${text}\n[${e.message}]` : e.message;
    }
  } finally {
    play.abort = null;
    $('send').disabled = false;
    $('stop').disabled = true;
  }
  if (ep.kind === 'chat') {
    play.history.push({ role: 'user', content: prompt }, { role: 'assistant', content: text });
  }
}

function stop() {
  // Aborting the fetch closes the connection: the host stops the plugin and frees its sequence.
  play.abort?.abort();
}

function clearConversation() {
  play.history = [];
  $('transcript').replaceChildren();
}

// ---------------------------------------------------------------- node view

const node = {
  timer: null,
  last: null, // previous scrape: {t, models: {name: {gen, stepSum, stepCount}}}
  series: {}, // model -> {rate: [], step: []}
  rows: { models: new Map(), plugins: new Map(), usage: new Map() },
};

// Prometheus text: name -> [{labels, value}].
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

function sample(metrics, name, match) {
  return (metrics.get(name) ?? [])
    .filter((s) => Object.entries(match).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
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

// A row per key that is updated in place, so refreshes never take the focus away.
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

async function modelAction(name, action) {
  try {
    await postAdmin(`/admin/models/${encodeURIComponent(name)}/${action}`);
    nodeError('');
  } catch (e) {
    nodeError(`${name}: ${e.message}`);
  }
  refreshNode();
}

function renderModels(models, metrics, now) {
  const current = {};
  const keep = new Set();
  for (const m of models) {
    keep.add(m.name);
    const gen = sample(metrics, 'flywheel_generated_tokens_total', { model: m.name });
    const stepSum = sample(metrics, 'flywheel_batch_duration_seconds_sum', { model: m.name });
    const stepCount = sample(metrics, 'flywheel_batch_duration_seconds_count', { model: m.name });
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
    const [name, state, seqs, kv, rate, step, keep_alive, actions] = tr.children;
    setText(name, m.name);
    setText(state, m.state + (m.pinned ? ' · pinned' : ''), `state-${m.state}`);
    setText(seqs, `${m.active_sequences} / ${m.max_sequences}`, 'num');
    setText(kv, String(m.kv_tokens), 'num');
    sparkline(rate, series.rate, 'tok/s');
    sparkline(step, series.step, 'ms');
    setText(keep_alive, m.keep_alive);
    actions.className = 'actions-cell';
    const loaded = m.state === 'loaded';
    button(actions, 'load', 'Load', () => modelAction(m.name, 'load')).disabled = loaded;
    button(actions, 'unload', 'Unload', () => modelAction(m.name, 'unload')).disabled = !loaded;
    const pin = button(actions, 'pin', m.pinned ? 'Unpin' : 'Pin', () => modelAction(m.name, pin.textContent === 'Pin' ? 'pin' : 'unpin'));
    for (const b of actions.querySelectorAll('button')) b.setAttribute('aria-label', `${b.textContent} ${m.name}`);
  }
  prune('models', keep);
  node.last = { t: now, models: current };
}

async function loadVersions(name, select) {
  try {
    const { live, versions } = await getJSON(`/admin/plugins/${encodeURIComponent(name)}/versions`, 'admin');
    select.replaceChildren(
      ...versions
        .slice()
        .reverse()
        .map((v) => new Option(`v${v.version}${v.version === live ? ' (live)' : ''} · ${v.deployed_by}`, String(v.version))),
    );
    select.dataset.loaded = 'yes';
  } catch (e) {
    select.replaceChildren(new Option('no versions', ''));
  }
}

async function rollback(name, select) {
  const version = Number(select.value);
  if (!version) return;
  try {
    await postAdmin(`/admin/plugins/${encodeURIComponent(name)}/rollback`, { version });
    nodeError('');
  } catch (e) {
    nodeError(`${name}: ${e.message}`);
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
    const serverErrors = (metrics.get('flywheel_http_requests_total') ?? [])
      .filter((s) => s.labels.plugin === p.name && Number(s.labels.status) >= 500)
      .reduce((sum, s) => sum + s.value, 0);
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

function nodeError(message) {
  $('node-error').textContent = message;
  $('node-error').hidden = !message;
}

async function refreshNode() {
  clearTimeout(node.timer);
  if ($('view-node').hidden || !signedIn()) return;
  try {
    const since = Math.floor(Date.now() / 1000) - 3600;
    const [models, plugins, usage, metricsText] = await Promise.all([
      getJSON('/admin/models', 'admin'),
      getJSON('/admin/plugins', 'admin'),
      getJSON(`/admin/usage?since=${since}`, 'admin'),
      fetch('/metrics').then((r) => r.text()),
    ]);
    const metrics = parseMetrics(metricsText);
    const now = performance.now();
    renderModels(models.models, metrics, now);
    renderPlugins(plugins.plugins, plugins.failed, metrics);
    renderUsage(usage);
    $('node-updated').textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    nodeError(`Refresh failed: ${e.message}`);
  }
  node.timer = setTimeout(refreshNode, REFRESH_MS);
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
    node.rows.plugins.get(name)?.remove();
    node.rows.plugins.delete(name);
  } catch (e) {
    $('deploy-result').textContent = `Refused: ${e.message}`;
  }
  refreshNode();
}

// ---------------------------------------------------------------- start

function start() {
  $('tab-play').addEventListener('click', () => show('view-play'));
  $('tab-node').addEventListener('click', () => show('view-node'));
  $('login').addEventListener('submit', signIn);
  $('logout-button').addEventListener('click', signOut);
  $('play').addEventListener('submit', send);
  $('stop').addEventListener('click', stop);
  $('clear').addEventListener('click', clearConversation);
  $('endpoint').addEventListener('change', endpointChanged);
  $('format').addEventListener('change', formatChanged);
  $('deploy').addEventListener('submit', deploy);
  $('api-key').value = sessionStorage.getItem(KEYS.api) ?? '';
  $('api-key').addEventListener('change', () => {
    const key = $('api-key').value.trim();
    if (key) sessionStorage.setItem(KEYS.api, key);
    else sessionStorage.removeItem(KEYS.api);
    loadModels();
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) $('play').requestSubmit();
  });
  renderLogin();
  loadEndpoints();
  loadModels();
  show(location.hash === '#node' ? 'view-node' : 'view-play');
}

start();
