// Live metrics: `/metrics` (Prometheus text) every 2 s, turned into four small charts. Keyed
// servers answer 403 to keys that are not admin keys; the section then says so and the rest of
// the console keeps working.

import { ApiError, formatBytes, formatCount, request } from './api.js';
import { LineChart } from './chart.js';

export const POLL_MS = 2000;

/** Samples of the text format: `name{label="v",...} value`; comments and blank lines skipped. */
export function parsePrometheus(text) {
  const families = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[l[1]] = l[2].replace(/\\n/g, '\n').replace(/\\(.)/g, '$1');
      }
    }
    const value = Number(m[4]);
    if (!families.has(m[1])) families.set(m[1], []);
    families.get(m[1]).push({ labels, value });
  }
  return families;
}

function sum(families, name) {
  const samples = families.get(name);
  return samples ? samples.reduce((a, s) => a + s.value, 0) : null;
}

export class MetricsPanel {
  constructor() {
    const chart = (id, options) => new LineChart(document.getElementById(id), options);
    this.charts = {
      tokens: chart('chart-tokens', { format: (v) => `${formatCount(v)}/s` }),
      sequences: chart('chart-sequences', { series: 2, format: formatCount }),
      kv: chart('chart-kv', { format: formatCount }),
      cache: chart('chart-cache', { format: formatBytes, base: 1024 }),
    };
    this.status = document.getElementById('metrics-status');
    this.message = document.getElementById('metrics-message');
    this.chartsEl = document.getElementById('charts');
    this.previous = null;
    this.timer = null;
    this.loop = 0;
  }

  start() {
    this.stop();
    this.previous = null;
    this.tick(this.loop);
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
    // A scrape still in flight belongs to the old loop and ends it.
    this.loop += 1;
  }

  async tick(loop) {
    if (document.hidden) {
      this.timer = setTimeout(() => this.tick(loop), POLL_MS);
      return;
    }
    try {
      const text = await (await request('/metrics')).text();
      if (loop !== this.loop) return;
      this.show(parsePrometheus(text), performance.now());
      this.setMessage(null);
      this.status.textContent = `Updated ${new Date().toLocaleTimeString()} · every ${POLL_MS / 1000} s`;
    } catch (e) {
      if (loop !== this.loop) return;
      if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
        // Polling again cannot help until the key changes (`start` is called then).
        this.setMessage(
          e.status === 403
            ? 'Live metrics need an admin key on this server. Adapters and the playground work with your key.'
            : 'Enter an API key above to see live metrics.',
        );
        this.status.textContent = 'Not available with this key';
        return;
      }
      this.status.textContent = `Metrics unavailable: ${e.message}`;
    }
    this.timer = setTimeout(() => this.tick(loop), POLL_MS);
  }

  setMessage(text) {
    this.message.hidden = !text;
    this.message.textContent = text || '';
    this.chartsEl.classList.toggle('dimmed', Boolean(text));
  }

  show(f, now) {
    const generated = sum(f, 'lorahost_generated_tokens_total') ?? 0;
    let rate = null;
    if (this.previous) {
      const dt = (now - this.previous.at) / 1000;
      if (dt > 0) rate = Math.max(0, (generated - this.previous.generated) / dt);
    }
    this.previous = { at: now, generated };
    this.charts.tokens.push([rate ?? 0]);
    setText('value-tokens', rate == null ? '–' : `${rate.toFixed(rate < 10 ? 1 : 0)}/s`);
    setText('sub-tokens', `${formatCount(generated)} generated since start`);

    const running = sum(f, 'lorahost_running_sequences') ?? 0;
    const waiting = sum(f, 'lorahost_waiting_sequences') ?? 0;
    const queued = sum(f, 'lorahost_queue_depth') ?? 0;
    this.charts.sequences.push([running, waiting]);
    setText('value-sequences', `${running} / ${waiting}`);
    setText('sub-sequences', `${queued} new request${queued === 1 ? '' : 's'} queued`);

    const kvUsed = sum(f, 'lorahost_kv_blocks_in_use') ?? 0;
    const kvTotal = sum(f, 'lorahost_kv_blocks_total');
    this.charts.kv.setCeiling(kvTotal);
    this.charts.kv.push([kvUsed]);
    setText('value-kv', formatCount(kvUsed));
    setText('sub-kv', kvTotal ? `${((100 * kvUsed) / kvTotal).toFixed(1)} % of ${formatCount(kvTotal)} blocks` : '');

    const resident = sum(f, 'lorahost_adapter_cache_resident_bytes');
    const budget = sum(f, 'lorahost_adapter_cache_budget_bytes');
    const count = sum(f, 'lorahost_adapter_cache_resident') ?? 0;
    this.charts.cache.push([resident ?? 0]);
    setText('value-cache', formatBytes(resident ?? 0));
    setText(
      'sub-cache',
      `${count} adapter${count === 1 ? '' : 's'} resident${budget ? ` · budget ${formatBytes(budget)}` : ''}`,
    );
    for (const name of Object.keys(this.charts)) describeChart(name);
  }
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

/** What a screen reader says for a chart: its title, the latest value and its caption. */
function describeChart(name) {
  const figure = document.querySelector(`[data-chart="${name}"]`);
  const title = figure.querySelector('figcaption > span').firstChild.textContent.trim();
  const value = document.getElementById(`value-${name}`).textContent;
  const sub = document.getElementById(`sub-${name}`).textContent;
  figure.querySelector('canvas').setAttribute('aria-label', `${title}: ${value}, ${sub}`);
}
