// The playground: one prompt sent to the base and to an adapter at the same time, each streamed
// from `/v1/chat/completions` (`stream: true`) by reading the server-sent events off the fetch
// body; Stop aborts both.

import { ApiError, errorFrom, authHeaders, h } from './api.js';

/** Yields the `data` of each server-sent event of a response body. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split('\n')
        .map((line) => line.replace(/\r$/, ''))
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(line.startsWith('data: ') ? 6 : 5));
      if (data.length) yield data.join('\n');
    }
  }
}

/** One output column: its text, state (`idle|streaming|done|stopped|error`) and figures. */
class Column {
  constructor(id) {
    this.el = document.getElementById(id);
    this.text = document.getElementById(`${id}-text`);
    this.model = document.getElementById(`${id}-model`);
    this.stats = document.getElementById(`${id}-stats`);
  }

  reset(model) {
    this.model.textContent = model;
    this.text.replaceChildren();
    this.stats.textContent = '';
    this.state('streaming');
  }

  state(s) {
    this.el.dataset.state = s;
    this.el.setAttribute('aria-busy', s === 'streaming' ? 'true' : 'false');
  }

  append(text) {
    this.text.append(text);
  }

  error(message) {
    this.text.append(h('span', { class: 'error-text' }, message));
    this.state('error');
  }

  figures({ tokens, firstMs, totalMs, finish }) {
    const parts = [`${tokens} token${tokens === 1 ? '' : 's'}`];
    if (firstMs != null) parts.push(`first after ${Math.round(firstMs)} ms`);
    if (firstMs != null && tokens > 1 && totalMs > firstMs) {
      parts.push(`${((tokens - 1) / ((totalMs - firstMs) / 1000)).toFixed(1)} tok/s`);
    }
    if (finish) parts.push(finish);
    this.stats.textContent = parts.join(' · ');
  }
}

export class Playground {
  constructor() {
    this.form = document.getElementById('play-form');
    this.prompt = document.getElementById('prompt');
    this.select = document.getElementById('play-adapter');
    this.maxTokens = document.getElementById('play-max');
    this.temperature = document.getElementById('play-temp');
    this.run = document.getElementById('play-run');
    this.stopButton = document.getElementById('play-stop');
    this.base = new Column('out-base');
    this.adapter = new Column('out-adapter');
    this.baseModel = null;
    this.controller = null;
    this.form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.start();
    });
    this.prompt.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        this.start();
      }
    });
    this.stopButton.addEventListener('click', () => this.stop());
    this.update();
  }

  setBase(id) {
    this.baseModel = id;
    this.update();
  }

  /** The adapters to choose from; keeps the current choice while it still exists. */
  setAdapters(adapters) {
    const current = this.select.value;
    const options = adapters.map((a) => h('option', { value: a.id }, a.id));
    if (!options.length) options.push(h('option', { value: '' }, 'No adapters: upload one'));
    this.select.replaceChildren(...options);
    if (adapters.some((a) => a.id === current)) this.select.value = current;
    this.update();
  }

  choose(id) {
    this.select.value = id;
    this.prompt.focus();
  }

  update() {
    const running = Boolean(this.controller);
    this.run.disabled = running || !this.baseModel;
    this.stopButton.disabled = !running;
    this.select.disabled = running || !this.select.value;
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  async start() {
    if (this.controller || !this.baseModel) return;
    const prompt = this.prompt.value.trim();
    if (!prompt) {
      this.prompt.focus();
      return;
    }
    const adapter = this.select.value;
    this.controller = new AbortController();
    this.update();
    const params = {
      messages: [{ role: 'user', content: prompt }],
      max_tokens: Math.max(1, Math.min(4096, Number(this.maxTokens.value) || 64)),
      temperature: Math.max(0, Number(this.temperature.value) || 0),
      stream: true,
      stream_options: { include_usage: true },
    };
    const runs = [this.stream(this.base, this.baseModel, params, this.controller.signal)];
    if (adapter) {
      runs.push(this.stream(this.adapter, adapter, params, this.controller.signal));
    } else {
      this.adapter.reset('');
      this.adapter.error('Upload an adapter to compare it with the base.');
    }
    await Promise.allSettled(runs);
    this.controller = null;
    this.update();
    this.form.dispatchEvent(new CustomEvent('finished', { bubbles: true }));
  }

  async stream(column, model, params, signal) {
    column.reset(model);
    const started = performance.now();
    let firstMs = null;
    let tokens = 0;
    let finish = null;
    const show = () => column.figures({ tokens, firstMs, totalMs: performance.now() - started, finish });
    try {
      const response = await fetch('/v1/chat/completions', {
        method: 'POST',
        headers: authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
        body: JSON.stringify({ ...params, model }),
        signal,
      });
      if (!response.ok) throw await errorFrom(response);
      for await (const data of events(response.body)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.code);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (firstMs == null) firstMs = performance.now() - started;
          tokens += 1;
          column.append(delta);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        show();
      }
      show();
      column.state('done');
    } catch (e) {
      show();
      if (e.name === 'AbortError') {
        column.append(h('span', { class: 'stopped-text' }, ' [stopped]'));
        column.state('stopped');
      } else {
        column.error(e.message);
      }
    }
  }
}
