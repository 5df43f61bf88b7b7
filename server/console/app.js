// The console's entry point: the API key form, the server's state and base model, and the
// panels (metrics, adapters, upload, playground) wired to each other.

import { ApiError, apiKey, getJson, setApiKey } from './api.js';
import { AdaptersPanel } from './adapters.js';
import { MetricsPanel } from './metrics.js';
import { Playground } from './playground.js';
import { UploadPanel } from './upload.js';

const notice = document.getElementById('notice');
const serverState = document.getElementById('server-state');
const serverStatus = document.getElementById('server-status');
const baseModel = document.getElementById('base-model');
const keyInput = document.getElementById('api-key');

function say(text) {
  notice.hidden = !text;
  notice.textContent = text || '';
}

function setServer(state, text) {
  serverState.dataset.state = state;
  serverStatus.textContent = text;
}

const metrics = new MetricsPanel();
const adapters = new AdaptersPanel();
const upload = new UploadPanel();
const playground = new Playground();

adapters.addEventListener('change', (e) => playground.setAdapters(e.detail));
adapters.addEventListener('use', (e) => playground.choose(e.detail));
adapters.addEventListener('reachable', (e) => {
  if (!e.detail) setServer('down', 'Connection lost, retrying…');
  else if (serverState.dataset.state === 'down') setServer('ready', 'Serving');
});
upload.addEventListener('uploaded', (e) => {
  adapters.refresh().then(() => playground.choose(e.detail.id));
});
playground.form.addEventListener('finished', () => adapters.refresh());

/** Who the server says we are: the base model (from `/v1/models`), or why not. */
async function connect() {
  try {
    const models = await getJson('/v1/models');
    const base = (models.data || []).find((m) => m.parent == null) || models.data[0];
    baseModel.textContent = base ? base.id : '';
    playground.setBase(base ? base.id : null);
    setServer('ready', 'Serving');
    say('');
    adapters.start();
    metrics.start();
  } catch (e) {
    playground.setBase(null);
    adapters.stop();
    if (e instanceof ApiError && e.status === 401) {
      setServer('locked', 'API key needed');
      say(apiKey() ? 'The server does not accept this API key.' : 'This server needs an API key: enter it above.');
      keyInput.focus();
      metrics.start();
    } else {
      setServer('down', 'Unreachable');
      say(`Cannot reach the server: ${e.message}. Retrying…`);
      setTimeout(connect, 3000);
    }
  }
}

keyInput.value = apiKey();
document.getElementById('key-form').addEventListener('submit', (e) => {
  e.preventDefault();
  setApiKey(keyInput.value.trim());
});
document.getElementById('key-forget').addEventListener('click', () => {
  keyInput.value = '';
  setApiKey('');
});
document.addEventListener('lorahost:key', connect);

connect();
