// Requests to this host, and the keys they carry. Keys live in this page's memory only:
// nothing else on this origin (another plugin's page in the same tab) can read them, and a
// reload asks for them again.

const keys = { admin: '', api: '' };

export function setKey(kind, value) {
  keys[kind] = value.trim();
}

export function hasKey(kind) {
  return keys[kind] !== '';
}

export function authHeaders(kind, extra = {}) {
  const key = keys[kind];
  return key ? { ...extra, authorization: `Bearer ${key}` } : { ...extra };
}

export async function errorOf(resp) {
  const body = await resp.json().catch(() => null);
  return new Error(body?.error?.message ?? `HTTP ${resp.status}`);
}

export async function getJSON(path, kind) {
  const resp = await fetch(path, { headers: authHeaders(kind) });
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

export async function postAdmin(path, body) {
  const init = { method: 'POST', headers: authHeaders('admin') };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}
