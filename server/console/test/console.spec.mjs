// The web console in headless Chromium against a running `lorahost serve` with API keys:
// key prompt, the metrics message for a non-admin key, upload by drop and by the file picker,
// the adapters table, the playground streaming base and adapter side by side (and Stop),
// metrics charts drawn, delete; screenshots at 1280 px and at phone width.
//
// Plain node, no test runner: `node console.spec.mjs` with
//   CONSOLE_URL         the server, e.g. http://127.0.0.1:38211
//   USER_KEY, ADMIN_KEY a tenant's key and an admin key of its keys file
//   ADAPTER_DIR         a PEFT adapter of the server's base
//   PLAYWRIGHT_DIR      where playwright-core is installed (its node_modules' parent)
//   SCREENSHOT_DIR      where the screenshots go
// Exits non-zero with the failed step's name.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const url = env('CONSOLE_URL');
const userKey = env('USER_KEY');
const adminKey = env('ADMIN_KEY');
const adapterDir = env('ADAPTER_DIR');
const screenshots = env('SCREENSHOT_DIR');
const { chromium } = createRequire(resolve(env('PLAYWRIGHT_DIR'), 'node_modules') + '/')('playwright-core');

const NAME = 'console-test-lora';
const started = Date.now();
let stepName = 'launch';

function step(name) {
  stepName = name;
  console.log(`console-test: ${((Date.now() - started) / 1000).toFixed(1)}s ${name}`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

const problems = [];
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
  page.on('console', (m) => {
    // The 401/403 answers the test provokes are logged as failed loads; anything else is a bug
    // (a CSP violation, an exception).
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(m.text());
  });

  step('the page asks for a key');
  const response = await page.goto(url);
  check(response.ok(), `GET / answered ${response.status()}`);
  check((response.headers()['content-security-policy'] || '').includes("script-src 'self'"), 'no CSP header');
  await page.waitForSelector('#server-state[data-state="locked"]');
  check(await page.isVisible('#notice'), 'no notice asking for a key');

  step("a tenant's key: ready, metrics need an admin key");
  await page.fill('#api-key', userKey);
  await page.click('#key-form button[type="submit"]');
  await page.waitForSelector('#server-state[data-state="ready"]');
  check((await page.textContent('#base-model')).trim().length > 0, 'no base model shown');
  await page.waitForSelector('#metrics-message:not([hidden])');
  check(/admin key/.test(await page.textContent('#metrics-message')), 'no admin-key message for metrics');
  const stored = await page.evaluate(() => [sessionStorage.getItem('lorahost.apiKey'), localStorage.length]);
  check(stored[0] === userKey && stored[1] === 0, `the key is not (only) in sessionStorage: ${stored}`);
  await page.waitForSelector('#adapters-empty:not([hidden])');

  step('upload by drag and drop');
  const config = readFileSync(join(adapterDir, 'adapter_config.json'));
  const weights = readFileSync(join(adapterDir, 'adapter_model.safetensors'));
  await page.fill('#adapter-name', NAME);
  await page.evaluate(
    ([c, w]) => {
      const bytes = (b64) => Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes(c)], 'adapter_config.json', { type: 'application/json' }));
      dt.items.add(new File([bytes(w)], 'adapter_model.safetensors'));
      const zone = document.getElementById('drop-zone');
      for (const type of ['dragenter', 'dragover', 'drop']) {
        zone.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
      }
    },
    [config.toString('base64'), weights.toString('base64')],
  );
  await page.waitForSelector('#drop-zone[data-state="ready"]');
  await page.click('#upload-button');
  await page.waitForSelector('#upload-status[data-kind="ok"]');
  const uploaded = await page.textContent('#upload-status');
  check(/Uploaded .*generation 1/.test(uploaded), `upload status: ${uploaded}`);

  step('the adapter is listed with tier, size and generation');
  const row = `#adapters-body tr[data-adapter="${NAME}"]`;
  await page.waitForSelector(row);
  const size = await page.textContent(`${row} [data-col="size"]`);
  check(/\d(\.\d+)? (KiB|MiB)/.test(size), `size cell: ${size}`);
  check((await page.textContent(`${row} [data-col="generation"]`)).trim() === '1', 'generation is not 1');
  // Publishing warms the host cache: the tier reaches `host` within a refresh or two.
  await page.waitForFunction(
    (sel) => {
      const tr = document.querySelector(sel);
      if (tr && tr.dataset.tier !== 'host') document.getElementById('adapters-refresh').click();
      return tr && tr.dataset.tier === 'host';
    },
    row,
    { polling: 500 },
  );
  check((await page.textContent(`${row} .tier`)).trim() === 'Host cache', 'tier label');

  step('a bad upload shows the server error');
  await page.fill('#adapter-name', 'broken');
  await page.setInputFiles('#adapter-files', [
    { name: 'adapter_config.json', mimeType: 'application/json', buffer: Buffer.from('{"r": 0}') },
    { name: 'adapter_model.safetensors', mimeType: 'application/octet-stream', buffer: weights },
  ]);
  await page.click('#upload-button');
  await page.waitForSelector('#upload-status[data-kind="error"]');
  const failed = await page.textContent('#upload-status');
  check(/\(422\).*invalid adapter/.test(failed), `error message: ${failed}`);

  step('replace through the file picker: generation 2');
  await page.fill('#adapter-name', NAME);
  await page.setInputFiles('#adapter-files', [
    join(adapterDir, 'adapter_config.json'),
    join(adapterDir, 'adapter_model.safetensors'),
  ]);
  await page.click('#upload-button');
  await page.waitForSelector('#upload-status[data-kind="ok"]');
  check(/Replaced .*generation 2/.test(await page.textContent('#upload-status')), 'replace status');
  await page.waitForSelector(`${row}[data-generation="2"]`);

  step('an admin key: metrics charts start, the adapter is tenant/name');
  await page.fill('#api-key', adminKey);
  await page.click('#key-form button[type="submit"]');
  await page.waitForSelector('#metrics-message[hidden]', { state: 'attached' });
  const adminName = `alice/${NAME}`;
  await page.waitForSelector(`#adapters-body tr[data-adapter="${adminName}"]`);

  step('playground: base and adapter stream side by side');
  await page.selectOption('#play-adapter', adminName);
  await page.fill('#play-max', '12');
  await page.fill('#prompt', 'Name three colours.');
  await page.click('#play-run');
  await page.waitForSelector('#out-base[data-state="streaming"]');
  await page.waitForFunction(
    () => ['out-base', 'out-adapter'].every((id) => document.getElementById(id).dataset.state === 'done'),
    null,
    { timeout: 90_000 },
  );
  for (const id of ['out-base', 'out-adapter']) {
    const text = (await page.textContent(`#${id}-text`)).trim();
    check(text.length > 0, `${id} streamed no text`);
    check(/\d+ tokens?/.test(await page.textContent(`#${id}-stats`)), `${id} has no token count`);
  }
  check((await page.textContent('#out-adapter-model')) === adminName, 'adapter column names the adapter');

  step('Stop aborts both streams');
  await page.fill('#play-max', '400');
  await page.click('#play-run');
  await page.waitForFunction(() =>
    ['out-base-text', 'out-adapter-text'].every((id) => document.getElementById(id).textContent.length > 0),
  );
  await page.click('#play-stop');
  await page.waitForFunction(() =>
    ['out-base', 'out-adapter'].every((id) => ['stopped', 'done'].includes(document.getElementById(id).dataset.state)),
  );
  const states = await page.$$eval('.output', (els) => els.map((e) => e.dataset.state));
  check(states.includes('stopped'), `Stop stopped nothing: ${states}`);
  check(await page.isEnabled('#play-run'), 'Run is not enabled again');

  step('traffic and metrics charts');
  await page.click('#adapters-refresh');
  await page.waitForFunction(
    (sel) => Number(document.querySelector(`${sel} [data-col="requests"]`)?.textContent) >= 2,
    `#adapters-body tr[data-adapter="${adminName}"]`,
  );
  await page.waitForFunction(() => Number(document.getElementById('chart-tokens').dataset.points) >= 3);
  const inked = await page.$$eval('canvas', (canvases) =>
    canvases.map((c) => {
      const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n += 1;
      return n;
    }),
  );
  check(inked.length === 4 && inked.every((n) => n > 100), `blank charts: ${inked}`);
  const kv = await page.textContent('#sub-kv');
  check(/% of \d/.test(kv), `KV caption: ${kv}`);

  step('screenshot at 1280 px');
  await page.screenshot({ path: join(screenshots, 'console.png'), fullPage: true });

  step('screenshot at phone width');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `the page scrolls sideways by ${overflow}px at 390px`);
  await page.screenshot({ path: join(screenshots, 'console-narrow.png'), fullPage: true });

  await page.setViewportSize({ width: 1280, height: 900 });

  step('delete the adapter');
  const del = `#adapters-body tr[data-adapter="${adminName}"] [data-action="delete"]`;
  await page.click(del);
  check((await page.textContent(del)).trim() === 'Confirm', 'delete does not ask to confirm');
  await page.click(del);
  await page.waitForSelector(`#adapters-body tr[data-adapter="${adminName}"]`, { state: 'detached' });
  await page.waitForSelector('#adapters-empty:not([hidden])');

  check(problems.length === 0, `browser errors:\n  ${problems.join('\n  ')}`);
  step('passed');
} catch (e) {
  console.error(`console-test: FAILED at "${stepName}": ${e.message}`);
  if (problems.length) console.error(`browser errors:\n  ${problems.join('\n  ')}`);
  if (page) {
    await page.screenshot({ path: join(screenshots, 'failure.png'), fullPage: true }).catch(() => {});
    console.error(`console-test: screenshot of the failure in ${join(screenshots, 'failure.png')}`);
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
