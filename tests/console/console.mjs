// The console in a real browser: Debian's Chromium driven over the DevTools protocol by
// playwright-core. Run by tests/console.rs against a live server:
//   node tests/console/console.mjs <base url> <admin key> <screenshot dir> <wasm v1> <wasm v2>
// with FLYWHEEL_BROWSER_TOOLCHAIN naming the folder playwright-core is installed in.
// Prints what it checked; exits non-zero with the reason on the first failure.
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';

const [url, adminKey, shots, wasmV1, wasmV2] = process.argv.slice(2);
const require = createRequire(`${process.env.FLYWHEEL_BROWSER_TOOLCHAIN}/package.json`);
const { chromium } = require('playwright-core');
mkdirSync(shots, { recursive: true });

const checks = [];
function ok(what) {
  checks.push(what);
  console.log(`ok: ${what}`);
}
function fail(what) {
  throw new Error(what);
}
async function until(what, probe, ms = 15000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > end) fail(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
async function adminModels() {
  const r = await fetch(`${url}/admin/models`, { headers: { authorization: `Bearer ${adminKey}` } });
  return (await r.json()).models;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  // As root in a container; no network beyond loopback.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});

async function openPage(viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console error: ${m.text()}`);
  });
  // Layout shifts, as Chromium reports them (the page must not move while tokens stream).
  await page.addInitScript(() => {
    window.__shift = 0;
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) if (!e.hadRecentInput) window.__shift += e.value;
    }).observe({ type: 'layout-shift', buffered: true });
  });
  await page.goto(`${url}/console/`);
  return { context, page, problems };
}

async function signIn(page) {
  await page.click('#tab-node');
  await page.fill('#admin-key', adminKey);
  await page.keyboard.press('Enter');
  await page.waitForSelector('#logout-button:not([hidden])');
}

async function noHorizontalScroll(page, width, view) {
  const scroll = await page.evaluate(() => document.documentElement.scrollWidth);
  if (scroll > width) fail(`${view} at ${width} px scrolls sideways (${scroll} px wide)`);
  ok(`${view} fits ${width} px without sideways scrolling`);
}

try {
  // ------------------------------------------------------------ desktop: playground
  const { page, problems } = await openPage({ width: 1280, height: 900 });
  await page.waitForFunction(() => [...document.querySelectorAll('#model option')].some((o) => o.value === 'smollm2'));
  ok('the playground lists the models from /v1/models');
  await page.selectOption('#endpoint', 'chat');
  await page.click('summary');
  await page.fill('#max-tokens', '40');
  await page.fill('#temperature', '0');
  await page.fill('#prompt', 'Name three colours.');
  const shiftBefore = await page.evaluate(() => window.__shift);
  // Keyboard only: Ctrl+Enter in the message box sends.
  await page.focus('#prompt');
  await page.keyboard.press('Control+Enter');
  const seen = new Set();
  await until('tokens to stream in', async () => {
    const n = Number(await page.textContent('#stat-tokens'));
    seen.add(n);
    return n > 0 && (await page.textContent('#stat-finish')) !== 'streaming';
  });
  const finish = await page.textContent('#stat-finish');
  if (!['stop', 'length'].includes(finish)) fail(`the answer finished as ${finish}`);
  const answer = await page.textContent('.message.assistant .text');
  if (!answer.trim()) fail('no streamed text appeared');
  if (seen.size < 3) fail(`the token counter did not move while streaming (saw ${[...seen]})`);
  const ttft = await page.textContent('#stat-ttft');
  const rate = await page.textContent('#stat-rate');
  if (!/^\d+ ms$/.test(ttft) || !/^\d+(\.\d)?$/.test(rate)) fail(`counters: first token ${ttft}, rate ${rate}`);
  ok(`a chat streamed ${await page.textContent('#stat-tokens')} tokens (counter moved through ${seen.size} values), first token ${ttft}, ${rate} tok/s, finish ${finish}`);
  const shift = (await page.evaluate(() => window.__shift)) - shiftBefore;
  if (shift > 0.001) fail(`the page shifted while tokens streamed (layout shift ${shift})`);
  ok(`no layout shift while tokens streamed (${shift})`);
  await page.screenshot({ path: `${shots}/playground-desktop.png`, fullPage: true });

  // Stop really cancels: the host frees the sequence.
  await page.fill('#max-tokens', '1500');
  await page.fill('#prompt', 'Write a very long story about a dragon who learns to bake bread.');
  await page.click('#send');
  await until('the long answer to start', async () => Number(await page.textContent('#stat-tokens')) >= 5);
  await until('a sequence open on the host', async () => (await adminModels()).some((m) => m.active_sequences > 0));
  await page.focus('#stop');
  await page.keyboard.press('Enter');
  await until('the stop to show', async () => (await page.textContent('#stat-finish')) === 'stopped', 5000);
  const stoppedAt = Number(await page.textContent('#stat-tokens'));
  await until('the host to free the sequence', async () => (await adminModels()).every((m) => m.active_sequences === 0), 3000);
  await new Promise((r) => setTimeout(r, 400));
  if (Number(await page.textContent('#stat-tokens')) !== stoppedAt) fail('tokens kept arriving after Stop');
  ok(`Stop cancelled the generation after ${stoppedAt} tokens and the host freed its sequence`);

  // ------------------------------------------------------------ desktop: node view
  await page.focus('#tab-node');
  await page.keyboard.press('Enter');
  if (await page.isHidden('#view-node')) fail('the Node tab does not open with the keyboard');
  if (await page.isVisible('#node')) fail('the node view shows data before signing in');
  ok('the Node tab opens from the keyboard, and shows nothing before signing in');
  await signIn(page);
  await page.waitForSelector('#models tr[data-key="smollm2"]');
  const state = await page.textContent('#models tr[data-key="smollm2"] td:nth-of-type(1)');
  if (!state.startsWith('loaded')) fail(`smollm2 shows as ${state}`);
  await page.waitForSelector('#plugins tr[data-key="openai"]');
  await page.waitForSelector('#plugins tr[data-key="console"]');
  await until('usage rows', async () => (await page.locator('#usage tbody tr').count()) > 0);
  // Two refreshes give the charts a point each.
  await until('the charts to get points', async () =>
    /tok\/s$/.test(await page.textContent('#models tr[data-key="smollm2"] td:nth-of-type(4) .value')), 8000);
  ok('the node view lists models (state, sequences, KV cells, tok/s and step time charts), plugins and usage');
  const clipped = await page.evaluate(() => {
    const frame = document.querySelector('#models').closest('.scroll').getBoundingClientRect();
    return [...document.querySelectorAll('#models button')].filter((b) => b.getBoundingClientRect().right > frame.right + 1).length;
  });
  if (clipped) fail(`${clipped} model buttons are cut off on a desktop`);
  await page.screenshot({ path: `${shots}/node-desktop.png`, fullPage: true });

  // Model actions.
  await page.click('#models tr[data-key="smollm2"] button[data-action="unload"]');
  await until('smollm2 to unload', async () =>
    (await page.textContent('#models tr[data-key="smollm2"] td:nth-of-type(1)')).startsWith('unloaded'));
  await page.click('#models tr[data-key="smollm2"] button[data-action="load"]');
  await until('smollm2 to load', async () =>
    (await page.textContent('#models tr[data-key="smollm2"] td:nth-of-type(1)')).startsWith('loaded'));
  ok('Unload and Load buttons unload and load the model');

  // Deploy two versions from the page, then roll back to the first.
  for (const [wasm, v] of [[wasmV1, 'v1'], [wasmV2, 'v2']]) {
    await page.fill('#deploy-name', 'from-console');
    await page.setInputFiles('#deploy-wasm', wasm);
    await page.fill('#deploy-by', 'browser-test');
    await page.click('#deploy button[type="submit"]');
    await until(`deploy ${v}`, async () => (await page.textContent('#deploy-result')).includes(`Deployed from-console ${v}`));
    await until(`${v} live in the table`, async () =>
      (await page.locator('#plugins tr[data-key="from-console"] td').first().textContent().catch(() => '')) === v);
  }
  const rollbackSelect = '#plugins tr[data-key="from-console"] select';
  await until('versions in the rollback list', async () => (await page.locator(`${rollbackSelect} option`).count()) >= 2);
  await page.selectOption(rollbackSelect, '1');
  await page.click('#plugins tr[data-key="from-console"] button[data-action="rollback"]');
  await until('the rollback to v1', async () =>
    (await page.locator('#plugins tr[data-key="from-console"] td').first().textContent()) === 'v1');
  ok('a plugin deployed twice from the page and rolled back to v1');

  if (problems.length) fail(problems.join('\n'));
  ok('no script errors or CSP violations on the desktop page');

  // ------------------------------------------------------------ 360 px
  const small = await openPage({ width: 360, height: 740 });
  await small.page.waitForFunction(() => document.querySelectorAll('#model option').length > 0);
  await noHorizontalScroll(small.page, 360, 'the playground');
  await small.page.screenshot({ path: `${shots}/playground-360.png`, fullPage: true });
  await signIn(small.page);
  await small.page.waitForSelector('#models tr[data-key="smollm2"]');
  await noHorizontalScroll(small.page, 360, 'the node view');
  await small.page.screenshot({ path: `${shots}/node-360.png`, fullPage: true });
  if (small.problems.length) fail(small.problems.join('\n'));
  console.log(JSON.stringify({ passed: checks.length }));
} catch (e) {
  console.error(`FAILED: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
