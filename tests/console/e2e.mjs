// Drives the admin console in headless Debian Chromium: logs in as a buyer, a seller and an admin and does
// one real task as each, checking the result in the page and through the API. tests/console_e2e.rs sets up
// the data and runs this; see docs/console.md.
//
// Environment:
//   CONSOLE_URL      the admin port, e.g. http://127.0.0.1:8081 (required)
//   GATEWAY_URL      the gateway port (optional: checks that a key created in the console works)
//   BUYER_USER, SELLER_USER, ADMIN_USER, and PASSWORD (one password for all three)
//   DISPUTE_ID       an open dispute the admin refunds (optional)
//   FLAGGED_KEY_ID   a flagged key the admin clears (optional)
//   SCREENSHOT_DIR   where the screenshots go (default: ./screenshots)
//   CHROMIUM         the browser (default: /usr/bin/chromium)

import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

const SETUP = 'run `scripts/setup.sh` (it installs Debian chromium and runs `npm ci` in tests/console)';

function fail(message) {
  console.error(`console e2e: FAILED: ${message}`);
  process.exit(1);
}

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) fail(`the environment variable ${name} is not set`);
  return value;
};

const CONSOLE_URL = env('CONSOLE_URL').replace(/\/$/, '');
const GATEWAY_URL = process.env.GATEWAY_URL?.replace(/\/$/, '');
const PASSWORD = env('PASSWORD');
const USERS = {
  buyer: env('BUYER_USER', 'buyer'),
  seller: env('SELLER_USER', 'seller'),
  admin: env('ADMIN_USER', 'admin'),
};
const SCREENSHOTS = resolve(env('SCREENSHOT_DIR', 'screenshots'));
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

if (!existsSync(CHROMIUM)) fail(`${CHROMIUM} does not exist: ${SETUP}`);
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  fail(`playwright-core cannot be loaded (${e.message.split('\n')[0]}): ${SETUP}`);
}
mkdirSync(SCREENSHOTS, { recursive: true });

// --- the API, for checks beside the UI (resolved through the OpenAPI document, as the console does) -----

let spec;
try {
  spec = await (await fetch(`${CONSOLE_URL}/api/v1/openapi.json`)).json();
} catch (e) {
  fail(`the API document at ${CONSOLE_URL}/api/v1/openapi.json cannot be loaded: ${e.message}`);
}
const operations = new Map();
for (const [path, item] of Object.entries(spec.paths)) {
  for (const [method, op] of Object.entries(item)) {
    if (op?.operationId) operations.set(op.operationId, { method: method.toUpperCase(), path });
  }
}

async function api(token, operationId, { params = {}, query = {}, body } = {}) {
  const op = operations.get(operationId);
  if (!op) throw new Error(`the API document has no operation ${operationId}`);
  const path = op.path.replace(/\{([^}]+)\}/g, (_, name) => encodeURIComponent(String(params[name])));
  const qs = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== undefined)).toString();
  const response = await fetch(`${CONSOLE_URL}${path}${qs ? `?${qs}` : ''}`, {
    method: op.method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${operationId}: HTTP ${response.status}: ${text}`);
  return text ? JSON.parse(text) : null;
}

// --- helpers --------------------------------------------------------------------------------------------

let passed = 0;
/** HTTP error statuses a step provokes on purpose; Chromium reports each failed fetch on the console. */
const expectedHttpErrors = new Set();
function ok(what) {
  passed += 1;
  console.log(`ok ${passed} - ${what}`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function shot(page, name) {
  // The pointer off the page, so that no hover highlight is in the picture.
  await page.mouse.move(1, 1);
  const path = join(SCREENSHOTS, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  console.log(`   screenshot ${path}`);
}

/** Waits until the view `role/section` has finished loading, and fails on any error it showed. */
async function view(page, route) {
  await page.waitForSelector(`main[data-view="${route}"][aria-busy="false"]`);
  await noErrors(page, route);
}

async function noErrors(page, what) {
  const errors = await page.locator('#messages .message-error').allTextContents();
  check(errors.length === 0, `${what}: the console shows an error: ${errors.join(' | ')}`);
}

async function open(page, role, section) {
  await page.click(`nav.tabs a[data-role="${role}"]`);
  await page.click(`nav.sections a[data-section="${section}"]`);
  await view(page, `${role}/${section}`);
}

async function login(page, role) {
  await page.goto(`${CONSOLE_URL}/`);
  check(new URL(page.url()).pathname === '/console/', `/ should lead to /console/, not ${page.url()}`);
  await page.waitForSelector('form[data-testid="login"]');
  await page.fill('input[name="username"]', USERS[role]);
  await page.fill('input[name="password"]', PASSWORD);
  await page.click('form[data-testid="login"] button[type="submit"]');
  await page.waitForSelector('[data-testid="username"]');
  check((await page.textContent('[data-testid="username"]')) === USERS[role], 'the header names the user');
  ok(`${role}: signed in as ${USERS[role]}`);
}

async function token(page) {
  const value = await page.evaluate(() => sessionStorage.getItem('tokex.session'));
  check(value, 'the session token is kept in sessionStorage');
  return value;
}

async function chartBars(page, testid) {
  await page.waitForSelector(`[data-testid="${testid}"] svg.chart`);
  return page.locator(`[data-testid="${testid}"] svg.chart .data rect.bar`).count();
}

async function logout(page, role) {
  await page.click('[data-testid="logout"]');
  await page.waitForSelector('form[data-testid="login"]');
  check(!(await page.evaluate(() => sessionStorage.getItem('tokex.session'))), 'signing out drops the token');
  ok(`${role}: signed out`);
}

// --- the roles --------------------------------------------------------------------------------------------

async function buyer(page) {
  await page.goto(`${CONSOLE_URL}/`);
  await page.waitForSelector('form[data-testid="login"]');
  await shot(page, '00-login');
  // A wrong password is refused with the API's error in the message area.
  expectedHttpErrors.add(401);
  await page.fill('input[name="username"]', USERS.buyer);
  await page.fill('input[name="password"]', 'not-the-password');
  await page.click('form[data-testid="login"] button[type="submit"]');
  const refused = await page.locator('#messages .message-error .message-code').textContent();
  check(refused === 'unauthorized', `a wrong password shows ${refused}`);
  expectedHttpErrors.clear();
  ok(`buyer: a wrong password is refused (${refused})`);
  await login(page, 'buyer');
  await view(page, 'buyer/overview');
  const bars = await chartBars(page, 'buyer-usage-chart');
  check(bars > 0, 'the usage chart shows the seeded traffic (no bars)');
  check((await page.locator('[data-testid="buyer-spend-by-model"] .bar-row').count()) > 0, 'spend by model has a row');
  ok(`buyer: usage chart drawn with ${bars} bars, spend by model listed`);
  await page.click('[aria-label="Metric"] button[data-value="spend"]');
  await page.click('[aria-label="Granularity"] button[data-value="day"]');
  await page.waitForSelector('.chart-slot[data-metric="spend"][data-granularity="day"] svg.chart path.line');
  await noErrors(page, 'daily spend');
  ok('buyer: switched the chart to daily spend');
  await shot(page, '10-buyer-overview');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('[data-testid="export-usage"]')]);
  const csv = readFileSync(await download.path(), 'utf8')
    .split('\n')
    .filter(Boolean);
  check(csv[0].startsWith('request_id,created_at_ms,model,'), `the usage export starts with ${JSON.stringify(csv[0])}`);
  check(csv.length > 1, 'the usage export has no rows');
  await noErrors(page, 'export');
  ok(`buyer: exported ${csv.length - 1} usage records as ${download.suggestedFilename()}`);

  await open(page, 'buyer', 'keys');
  const name = `console-e2e-${Date.now()}`;
  await page.fill('form[data-testid="create-key"] input[name="name"]', name);
  await page.click('form[data-testid="create-key"] button[type="submit"]');
  const secret = (await page.textContent('[data-testid="new-key"]', { timeout: 15000 }))?.trim() ?? '';
  check(secret.startsWith('tkx-'), `the new key is shown once (got ${JSON.stringify(secret)})`);
  await page.waitForSelector(`[data-testid="buyer-keys"] tr:has-text("${name}")`);
  await noErrors(page, 'create key');
  const listed = await api(await token(page), 'buyer_keys_list');
  check(
    listed.keys.some((k) => k.name === name && k.status === 'active'),
    `${name} is not in buyer_keys_list`,
  );
  if (GATEWAY_URL) {
    const models = await fetch(`${GATEWAY_URL}/v1/models`, { headers: { Authorization: `Bearer ${secret}` } });
    check(models.status === 200, `the new key is refused by the gateway: HTTP ${models.status}`);
  }
  ok(`buyer: created the API key ${name}; the API lists it${GATEWAY_URL ? ' and the gateway accepts it' : ''}`);
  await shot(page, '11-buyer-keys');
  await page.reload();
  await view(page, 'buyer/keys');
  check((await page.locator('[data-testid="new-key"]').count()) === 0, 'the new key is shown again after a reload');
  ok('buyer: the session survives a reload; the new key is not shown again');

  await open(page, 'buyer', 'escrows');
  await shot(page, '12-buyer-escrows');
  const escrow = await page.locator('[data-testid="escrows"] tbody tr').first().getAttribute('data-id');
  check(escrow, 'the buyer has no escrow to dispute');
  await open(page, 'buyer', 'disputes');
  await page.selectOption('form[data-testid="open-dispute"] select[name="kind"]', 'escrow');
  await page.fill('form[data-testid="open-dispute"] input[name="target"]', `#${escrow}`);
  await page.fill(
    'form[data-testid="open-dispute"] textarea[name="reason"]',
    'The escrow was charged for a model I never used.',
  );
  await page.click('form[data-testid="open-dispute"] button[type="submit"]');
  await page.waitForSelector(`[data-testid="buyer-disputes"] tr:has-text("Escrow #${escrow}")`);
  await noErrors(page, 'open dispute');
  const mine = await api(await token(page), 'buyer_disputes_list');
  check(
    mine.disputes.some((d) => String(d.escrow_id) === escrow && d.target_kind === 'escrow' && d.status === 'open'),
    `buyer_disputes_list lacks the escrow dispute: ${JSON.stringify(mine)}`,
  );
  ok(`buyer: opened a dispute on escrow #${escrow}`);
  await shot(page, '13-buyer-disputes');
  await logout(page, 'buyer');
}

async function seller(page) {
  await login(page, 'seller');
  // This seller is also a buyer: one tab per role, the buyer's first.
  const tabs = await page.locator('nav.tabs a').allTextContents();
  check(tabs.join(',') === 'Buyer,Seller', `the tabs are ${tabs.join(', ')}`);
  await view(page, 'buyer/overview');
  await page.click('nav.tabs a[data-role="seller"]');
  await view(page, 'seller/overview');
  ok('seller: a tab per role (buyer, seller)');
  const bars = await chartBars(page, 'seller-earnings-chart');
  check(bars > 0, 'the earnings chart shows the seeded traffic (no bars)');
  ok(`seller: earnings chart drawn with ${bars} bars`);
  await shot(page, '20-seller-earnings');

  await open(page, 'seller', 'keys');
  const pause = page.locator('[data-testid^="pause-"]').first();
  const id = (await pause.getAttribute('data-testid')).slice('pause-'.length);
  const row = page.locator(`[data-testid="seller-keys"] tr[data-id="${id}"]`);
  await pause.click();
  await page.waitForSelector(`[data-testid="resume-${id}"]`);
  await noErrors(page, 'pause');
  check((await row.locator('.badge').first().textContent()) === 'paused', `key ${id} does not show paused`);
  const seller = await token(page);
  check(
    (await api(seller, 'seller_keys_get', { params: { id } })).status === 'paused',
    `the API does not report key ${id} paused`,
  );
  ok(`seller: paused key ${id}`);
  await shot(page, '21-seller-key-paused');
  await page.click(`[data-testid="resume-${id}"]`);
  await page.waitForSelector(`[data-testid="pause-${id}"]`);
  await noErrors(page, 'resume');
  check(
    (await api(seller, 'seller_keys_get', { params: { id } })).status === 'active',
    `the API does not report key ${id} active`,
  );
  ok(`seller: resumed key ${id}`);
  await shot(page, '22-seller-keys');

  await open(page, 'seller', 'notifications');
  await shot(page, '23-seller-notifications');
  const unread = page.locator('[data-testid="notifications"] button:has-text("Mark read")');
  if ((await unread.count()) > 0) {
    const before = await unread.count();
    await unread.first().click();
    await page.waitForFunction(
      (n) => document.querySelectorAll('[data-testid="notifications"] button').length < n,
      before,
    );
    await noErrors(page, 'mark read');
    ok('seller: marked a notification read');
  }
  await logout(page, 'seller');
}

async function admin(page) {
  await login(page, 'admin');
  await view(page, 'admin/report');
  const bars = await chartBars(page, 'platform-chart');
  check(bars > 0, 'the platform chart shows the seeded traffic (no bars)');
  check((await page.locator('[data-testid="by-model"] tbody tr').count()) > 0, 'the by-model table is empty');
  const stats = await page.locator('[data-testid="platform-report"] .stat').count();
  check(stats >= 6, `the platform report shows ${stats} figures`);
  ok(`admin: platform report with ${stats} figures, ${bars} bars and a by-model table`);
  await shot(page, '30-admin-report');
  const adminToken = await token(page);

  const flagged = process.env.FLAGGED_KEY_ID;
  await open(page, 'admin', 'reviews');
  await shot(page, '31-admin-reviews');
  if (flagged) {
    await page.click(`[data-testid="clear-${flagged}"]`);
    await page.waitForSelector(`[data-testid="reviews"] tr[data-id="${flagged}"]`, { state: 'detached' });
    await noErrors(page, 'clear flagged key');
    const keys = await api(adminToken, 'admin_keys_list');
    const key = keys.keys.find((k) => String(k.id) === flagged);
    check(key?.status === 'active', `the cleared key ${flagged} is ${key?.status}`);
    ok(`admin: cleared flagged key ${flagged}; it is active again`);
  }

  await open(page, 'admin', 'prices');
  const model = `console-e2e/model-${Date.now()}`;
  await page.fill('form[data-testid="set-price"] input[name="model"]', model);
  await page.fill('form[data-testid="set-price"] input[name="prompt_per_million"]', '123,000');
  await page.fill('form[data-testid="set-price"] input[name="completion_per_million"]', '456000');
  await page.click('form[data-testid="set-price"] button[type="submit"]');
  await page.waitForSelector(`[data-testid="prices"] tr[data-id="${model}"]`);
  await noErrors(page, 'set price');
  const price = (await api(adminToken, 'prices_list')).find((p) => p.model === model);
  check(
    price?.prompt_per_million === 123000 && price?.completion_per_million === 456000,
    `prices_list has ${JSON.stringify(price)}`,
  );
  ok(`admin: set the price of ${model} (a model name with a slash)`);
  await shot(page, '32-admin-prices');

  const dispute = process.env.DISPUTE_ID;
  await open(page, 'admin', 'disputes');
  await shot(page, '33-admin-disputes-open');
  if (dispute) {
    await page.fill(
      `[data-testid="admin-disputes"] tr[data-id="${dispute}"] input[name="note"]`,
      'Truncated answer confirmed in the logs.',
    );
    await page.click(`[data-testid="refund-${dispute}"]`);
    await page.waitForSelector(`[data-testid="admin-disputes"] tr[data-id="${dispute}"]`, { state: 'detached' });
    await noErrors(page, 'refund dispute');
    const refunded = await api(adminToken, 'admin_disputes_list', { query: { status: 'refunded' } });
    const done = refunded.disputes.find((d) => String(d.id) === dispute);
    check(done?.refunded_credits > 0, `dispute ${dispute} is not refunded: ${JSON.stringify(done)}`);
    check(
      done.resolution_note === 'Truncated answer confirmed in the logs.',
      `the note is ${JSON.stringify(done.resolution_note)}`,
    );
    ok(`admin: refunded dispute ${dispute} (${done.refunded_credits} credits back to the buyer)`);
  }
  // The buyer's escrow dispute, opened in the console above: rejected.
  const reject = page.locator('[data-testid^="reject-"]').first();
  const rejected = (await reject.getAttribute('data-testid')).slice('reject-'.length);
  await reject.click();
  await page.waitForSelector(`[data-testid="admin-disputes"] tr[data-id="${rejected}"]`, { state: 'detached' });
  await noErrors(page, 'reject dispute');
  const closed = await api(adminToken, 'admin_disputes_list', { query: { status: 'rejected' } });
  check(
    closed.disputes.some((d) => String(d.id) === rejected && d.refunded_credits === 0),
    `dispute ${rejected} is not rejected`,
  );
  ok(`admin: rejected dispute ${rejected}`);
  await page.click('[aria-label="Status"] button[data-value="all"]');
  await view(page, 'admin/disputes');
  await page.waitForSelector(`[data-testid="admin-disputes"] tr[data-id="${rejected}"]`);
  await shot(page, '34-admin-disputes-all');

  await open(page, 'admin', 'fallback');
  await shot(page, '35-admin-fallback');
  await open(page, 'admin', 'users');
  // An API error is shown to the user: the username is taken. (Chromium logs the 409 as a console error.)
  expectedHttpErrors.add(409);
  await page.fill('form[data-testid="create-user"] input[name="username"]', USERS.buyer);
  await page.fill('form[data-testid="create-user"] input[name="password"]', 'another-long-password-1');
  await page.click('form[data-testid="create-user"] button[type="submit"]');
  const error = page.locator('#messages .message-error');
  await error.waitFor();
  const shown = await error.locator('.message-text').textContent();
  const code = await error.locator('.message-code').textContent();
  check(code === 'conflict', `the error shows the code ${code}`);
  ok(`admin: an API error is shown in the message area: ${shown} (${code})`);
  await shot(page, '36-admin-users-error');
  expectedHttpErrors.clear();
  await logout(page, 'admin');
}

// --- run ----------------------------------------------------------------------------------------------------

const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
let failed = false;
try {
  for (const [role, run] of [
    ['buyer', buyer],
    ['seller', seller],
    ['admin', admin],
  ]) {
    // A context of its own per role: a fresh profile, so no session leaks from one role to the next.
    const context = await browser.newContext({ viewport: { width: 1360, height: 880 }, deviceScaleFactor: 1 });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    const problems = [];
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      const status = /the server responded with a status of (\d+)/.exec(m.text())?.[1];
      if (status && expectedHttpErrors.has(Number(status))) return;
      problems.push(`console error: ${m.text()}`);
    });
    try {
      await run(page);
      check(problems.length === 0, problems.join('\n'));
    } catch (e) {
      failed = true;
      console.error(`console e2e: ${role} failed: ${e.message}`);
      for (const problem of problems) console.error(`   ${problem}`);
      const shown = await page
        .locator('#messages')
        .textContent()
        .catch(() => '');
      if (shown) console.error(`   the message area shows: ${shown}`);
      await shot(page, `failure-${role}`).catch(() => {});
    } finally {
      await context.close();
    }
    if (failed) break;
  }
} finally {
  await browser.close();
}
if (failed) fail(`${passed} checks passed before the failure; screenshots in ${SCREENSHOTS}`);
console.log(`console e2e: ${passed} checks passed; screenshots in ${SCREENSHOTS}`);
