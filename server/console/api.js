// Talking to the server: the API key (kept in sessionStorage only), authorised fetches, and the
// API's error shape `{"error": {"message", "type", "code", "param"}}` turned into exceptions.

const KEY_STORAGE = 'lorahost.apiKey';

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || '';
  } catch {
    return '';
  }
}

/** Stores (or with an empty string forgets) the key and tells the page. */
export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage can be disabled; the key then lasts until the page is reloaded.
  }
  memoryKey = key;
  document.dispatchEvent(new CustomEvent('lorahost:key'));
}

let memoryKey = apiKey();

export function authHeaders(extra = {}) {
  const key = memoryKey || apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The server's message for a failed response, or the status line when the body is not the API's. */
export async function errorFrom(response) {
  let message = `${response.status} ${response.statusText || 'error'}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code || null;
    }
  } catch {
    // Not JSON: keep the status line.
  }
  return new ApiError(response.status, message, code);
}

/** A request with the key; resolves to the response, throws `ApiError` unless it is 2xx. */
export async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'the server cannot be reached');
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function formatBytes(n) {
  if (n == null || !Number.isFinite(n)) return '–';
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i === 0 ? n : Number(n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0))} ${UNITS[i]}`;
}

const COMPACT = new Intl.NumberFormat(undefined, { notation: 'compact', maximumFractionDigits: 1 });

export function formatCount(n) {
  if (n == null || !Number.isFinite(n)) return '–';
  return n < 10000 ? String(Math.round(n)) : COMPACT.format(n);
}

/** `h('td', {class: 'num'}, 'text', node)`: elements built without ever parsing markup. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) {
    if (c != null) el.append(c);
  }
  return el;
}
