// Flywheel console: the playground (playground.js) and this node's view (node.js), both
// talking to this host only. Keys stay in this page's memory (http.js).
import { getJSON, hasKey, setKey } from './http.js';
import { refreshNode, startNode } from './node.js';
import { loadEndpoints, startPlayground } from './playground.js';

const $ = (id) => document.getElementById(id);

function show(view) {
  for (const [tab, section] of [['tab-play', 'view-play'], ['tab-node', 'view-node']]) {
    const on = section === view;
    $(tab).setAttribute('aria-pressed', String(on));
    $(section).hidden = !on;
  }
  history.replaceState(null, '', view === 'view-node' ? '#node' : '#play');
  if (view === 'view-node') refreshNode();
}

function renderLogin(message = '') {
  const on = hasKey('admin');
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
  setKey('admin', key);
  try {
    await getJSON('/admin/models', 'admin');
    $('admin-key').value = '';
    renderLogin();
    await loadEndpoints();
    refreshNode();
  } catch (e) {
    setKey('admin', '');
    renderLogin(`Not signed in: ${e.message}`);
  }
}

function signOut() {
  setKey('admin', '');
  renderLogin();
  loadEndpoints();
}

$('tab-play').addEventListener('click', () => show('view-play'));
$('tab-node').addEventListener('click', () => show('view-node'));
$('login').addEventListener('submit', signIn);
$('logout-button').addEventListener('click', signOut);
renderLogin();
startPlayground();
startNode();
show(location.hash === '#node' ? 'view-node' : 'view-play');
