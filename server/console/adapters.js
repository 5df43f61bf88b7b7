// The adapters table: `GET /v1/adapters` (tier, size, shape, generation, traffic), a delete
// button per adapter (press twice: the first press asks), and the list other parts choose from.

import { formatBytes, formatCount, getJson, h, request } from './api.js';

export const REFRESH_MS = 5000;
const CONFIRM_MS = 4000;

const TIERS = {
  host: { label: 'Host cache', hint: 'Resident in the host cache: its next request starts at once' },
  loading: { label: 'Loading', hint: 'Being loaded into the host cache' },
  disk: { label: 'Disk', hint: 'Stored on disk only: its next request waits for a load' },
};

function shape(a) {
  const parts = [];
  if (a.rank != null) parts.push(`r${a.rank}`);
  if (a.alpha != null) parts.push(`α${a.alpha}`);
  if (a.use_dora) parts.push('DoRA');
  return parts.join(' · ') || '–';
}

function targets(a) {
  if (Array.isArray(a.targets)) return a.targets.map((t) => t.replace(/_proj$/, '')).join(', ');
  return a.targets || '';
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

export class AdaptersPanel extends EventTarget {
  constructor() {
    super();
    this.body = document.getElementById('adapters-body');
    this.empty = document.getElementById('adapters-empty');
    this.count = document.getElementById('adapter-count');
    this.status = document.getElementById('adapters-status');
    this.adapters = [];
    this.timer = null;
    this.epoch = 0;
    this.pendingDelete = null;
    document.getElementById('adapters-refresh').addEventListener('click', () => this.refresh());
  }

  /** Refreshes now and then every few seconds while the page is visible. */
  start() {
    clearInterval(this.timer);
    this.epoch += 1;
    this.refresh();
    this.timer = setInterval(() => {
      if (!document.hidden && !this.pendingDelete) this.refresh();
    }, REFRESH_MS);
  }

  /** Stops refreshing and empties the table (no key, or a key the server refuses). */
  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.epoch += 1;
    this.adapters = [];
    this.render();
    this.dispatchEvent(new CustomEvent('change', { detail: this.adapters }));
  }

  async refresh() {
    // A key change (`stop`, `start`) makes answers to requests sent before it stale.
    const epoch = this.epoch;
    try {
      const list = await getJson('/v1/adapters');
      if (epoch !== this.epoch) return;
      this.adapters = list.data || [];
      this.render();
      if (this.status.dataset.kind === 'error') this.say('');
      this.dispatchEvent(new CustomEvent('reachable', { detail: true }));
    } catch (e) {
      if (epoch !== this.epoch) return;
      this.say(`Cannot list adapters: ${e.message}`, 'error');
      if (e.status === 0) this.dispatchEvent(new CustomEvent('reachable', { detail: false }));
    }
    this.dispatchEvent(new CustomEvent('change', { detail: this.adapters }));
  }

  say(text, kind = 'info') {
    this.status.textContent = text;
    this.status.dataset.kind = kind;
  }

  render() {
    const rows = this.adapters.map((a) => this.row(a));
    this.body.replaceChildren(...rows);
    this.empty.hidden = this.adapters.length > 0;
    this.count.textContent = this.adapters.length ? String(this.adapters.length) : '';
  }

  row(a) {
    const tier = TIERS[a.residency] || { label: a.residency, hint: '' };
    const traffic = a.traffic || {};
    const del = h('button', { type: 'button', class: 'ghost small danger-text', 'data-action': 'delete' }, 'Delete');
    del.dataset.name = a.id;
    del.setAttribute('aria-label', `Delete ${a.id}`);
    del.addEventListener('click', () => this.onDelete(a, del));
    const use = h('button', { type: 'button', class: 'ghost small', 'data-action': 'use' }, 'Try');
    use.setAttribute('aria-label', `Try ${a.id} in the playground`);
    use.addEventListener('click', () => this.dispatchEvent(new CustomEvent('use', { detail: a.id })));
    const created = a.created ? ago(a.created) : '';
    return h(
      'tr',
      { 'data-adapter': a.id, 'data-tier': a.residency, 'data-generation': a.generation },
      h(
        'th',
        { scope: 'row', class: 'name' },
        h('span', { class: 'adapter-name' }, a.id),
        h('span', { class: 'sub', title: a.adapter_id }, `${(a.adapter_id || '').slice(0, 12)} · ${created}`),
      ),
      h('td', { 'data-label': 'Tier' }, h('span', { class: `tier tier-${a.residency}`, title: tier.hint }, tier.label)),
      h('td', { class: 'num', 'data-col': 'size', 'data-label': 'Size', title: `${a.bytes} bytes` }, formatBytes(a.bytes)),
      h(
        'td',
        { class: 'shape', 'data-label': 'Shape' },
        h('span', {}, shape(a)),
        h('span', { class: 'sub' }, targets(a)),
      ),
      h('td', { class: 'num', 'data-col': 'generation', 'data-label': 'Generation' }, String(a.generation)),
      h('td', { class: 'num', 'data-col': 'requests', 'data-label': 'Requests' }, formatCount(traffic.requests ?? 0)),
      h(
        'td',
        { class: 'num', 'data-col': 'tokens', 'data-label': 'Tokens in / out' },
        `${formatCount(traffic.prompt_tokens ?? 0)} / ${formatCount(traffic.generated_tokens ?? 0)}`,
      ),
      h('td', { class: 'row-actions' }, use, del),
    );
  }

  async onDelete(a, button) {
    if (this.pendingDelete !== button) {
      this.cancelPendingDelete();
      this.pendingDelete = button;
      button.textContent = 'Confirm';
      button.classList.add('confirm');
      button.setAttribute('aria-label', `Confirm deleting ${a.id}`);
      this.pendingTimer = setTimeout(() => this.cancelPendingDelete(), CONFIRM_MS);
      return;
    }
    this.cancelPendingDelete();
    button.disabled = true;
    try {
      await request(`/v1/adapters/${encodeURIComponent(a.id)}`, { method: 'DELETE' });
      this.say(`Deleted ${a.id}.`);
    } catch (e) {
      this.say(`Cannot delete ${a.id}: ${e.message}`, 'error');
    }
    await this.refresh();
  }

  cancelPendingDelete() {
    clearTimeout(this.pendingTimer);
    const b = this.pendingDelete;
    this.pendingDelete = null;
    if (b && b.isConnected) {
      b.textContent = 'Delete';
      b.classList.remove('confirm');
      b.setAttribute('aria-label', `Delete ${b.dataset.name}`);
    }
  }
}
