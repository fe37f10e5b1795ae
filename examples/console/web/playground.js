// The playground: stream an answer from the OpenAI API, or from any plugin speaking the
// `complete` protocol, with live counters; Stop aborts the request, which makes the host stop
// the plugin and free its sequence.
import { authHeaders, errorOf, getJSON, hasKey, setKey } from './http.js';
import { readEvents } from './sse.js';

const $ = (id) => document.getElementById(id);

const BASE_ENDPOINTS = [
  { id: 'chat', label: 'Chat · /v1/chat/completions', path: '/v1/chat/completions', kind: 'chat' },
  { id: 'completions', label: 'Completion · /v1/completions', path: '/v1/completions', kind: 'completions' },
];

const play = {
  endpoints: [...BASE_ENDPOINTS],
  history: [], // chat turns: {role, content}
  abort: null,
};

/** The endpoints: OpenAI's, then every other plugin (as `complete`-protocol endpoints). */
export async function loadEndpoints() {
  const endpoints = [...BASE_ENDPOINTS];
  if (hasKey('admin')) {
    try {
      const { plugins } = await getJSON('/admin/plugins', 'admin');
      for (const p of plugins) {
        if (p.name === 'openai' || p.name === 'console') continue;
        endpoints.push({ id: `fn-${p.name}`, label: `${p.name} · /fn/${p.name} (complete protocol)`, path: `/fn/${p.name}`, kind: 'complete' });
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
    showError('');
  } catch (e) {
    showError(`Models: ${e.message}. If the server needs an API key, enter it above.`);
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

function showError(message) {
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

/** One answer's live counters. */
class Meter {
  constructor() {
    this.started = performance.now();
    this.first = null;
    this.tokens = 0;
    this.render('streaming');
  }

  piece() {
    if (this.first === null) this.first = performance.now();
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
    showError(`The JSON Schema is not valid JSON: ${e.message}`);
    return;
  }
  showError('');
  addMessage('user', prompt);
  $('prompt').value = '';
  const answer = addMessage('assistant');
  const meter = new Meter();
  const controller = new AbortController();
  play.abort = controller;
  $('send').disabled = true;
  $('stop').disabled = false;
  // Screen readers hear the answer once it is complete, not every token.
  $('transcript').setAttribute('aria-busy', 'true');
  let text = '';
  let finish = null;
  let outcome = 'error';
  try {
    const resp = await fetch(ep.path, {
      method: 'POST',
      headers: authHeaders('api', { 'content-type': 'application/json' }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    let complete = false;
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
    outcome = 'done';
    meter.render(finish ?? 'done');
  } catch (e) {
    if (e.name === 'AbortError') {
      outcome = 'stopped';
      meter.render('stopped');
    } else {
      meter.render('error');
      answer.wrap.classList.add('error');
      answer.body.textContent = text ? `${text}\n[${e.message}]` : e.message;
    }
  } finally {
    // Whatever happened, nothing keeps generating (or charging the key) for this answer.
    controller.abort();
    play.abort = null;
    $('send').disabled = false;
    $('stop').disabled = true;
    $('transcript').setAttribute('aria-busy', 'false');
  }
  // A failed turn is not resent with the next message; a stopped one keeps what arrived.
  if (ep.kind === 'chat' && (outcome === 'done' || (outcome === 'stopped' && text))) {
    play.history.push({ role: 'user', content: prompt }, { role: 'assistant', content: text });
  }
}

function clearConversation() {
  play.history = [];
  $('transcript').replaceChildren();
}

export function startPlayground() {
  $('play').addEventListener('submit', send);
  // Aborting the fetch closes the connection: the host stops the plugin and frees its sequence.
  $('stop').addEventListener('click', () => play.abort?.abort());
  $('clear').addEventListener('click', clearConversation);
  $('endpoint').addEventListener('change', endpointChanged);
  $('format').addEventListener('change', formatChanged);
  $('api-key').addEventListener('change', () => {
    setKey('api', $('api-key').value);
    loadModels();
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) $('play').requestSubmit();
  });
  loadEndpoints();
  loadModels();
}
