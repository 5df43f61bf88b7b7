// Uploading an adapter: files dropped on the zone (the two files, or the folder holding them)
// or picked with the file input, a name, and `PUT /v1/adapters/{name}` as multipart with the
// parts `adapter_config.json` and `adapter_model.safetensors`, as `curl -F` sends them.

import { request } from './api.js';

const CONFIG = 'adapter_config.json';
const WEIGHTS = 'adapter_model.safetensors';
const NAME_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/** Which part a file is: by its exact name first, then by its extension. */
function partOf(file) {
  if (file.name === CONFIG) return 'config';
  if (file.name === WEIGHTS) return 'weights';
  if (file.name.endsWith('.safetensors')) return 'weights';
  if (file.name.endsWith('.json')) return 'config';
  return null;
}

/** The files of a drop, reading into a dropped folder (one level) when there is one. */
async function droppedFiles(dataTransfer) {
  const files = [];
  let folder = null;
  const entries = [...(dataTransfer.items || [])]
    .filter((item) => item.kind === 'file')
    .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  for (const entry of entries) {
    if (entry && entry.isDirectory) {
      folder = folder || entry.name;
      const children = await new Promise((resolve, reject) => entry.createReader().readEntries(resolve, reject));
      for (const child of children) {
        if (child.isFile) files.push(await new Promise((resolve, reject) => child.file(resolve, reject)));
      }
    }
  }
  if (!folder) files.push(...dataTransfer.files);
  return { files, folder };
}

export class UploadPanel extends EventTarget {
  constructor() {
    super();
    this.form = document.getElementById('upload-form');
    this.zone = document.getElementById('drop-zone');
    this.input = document.getElementById('adapter-files');
    this.name = document.getElementById('adapter-name');
    this.button = document.getElementById('upload-button');
    this.status = document.getElementById('upload-status');
    this.files = { config: null, weights: null };

    this.input.addEventListener('change', () => {
      this.take([...this.input.files], null);
      this.input.value = '';
    });
    let depth = 0;
    this.zone.addEventListener('dragenter', (e) => {
      e.preventDefault();
      depth += 1;
      this.zone.classList.add('over');
    });
    this.zone.addEventListener('dragover', (e) => {
      e.preventDefault();
      if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy';
    });
    this.zone.addEventListener('dragleave', () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) this.zone.classList.remove('over');
    });
    this.zone.addEventListener('drop', async (e) => {
      e.preventDefault();
      depth = 0;
      this.zone.classList.remove('over');
      if (!e.dataTransfer) return;
      try {
        const { files, folder } = await droppedFiles(e.dataTransfer);
        this.take(files, folder);
      } catch (err) {
        this.say(`Cannot read the dropped files: ${err.message}`, 'error');
      }
    });
    // A file dropped next to the zone would make the browser navigate to it.
    for (const type of ['dragover', 'drop']) {
      window.addEventListener(type, (e) => {
        if (!this.zone.contains(e.target)) e.preventDefault();
      });
    }
    this.name.addEventListener('input', () => this.update());
    document.getElementById('upload-clear').addEventListener('click', () => this.clear());
    this.form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.upload();
    });
    this.update();
  }

  take(files, folder) {
    const ignored = [];
    for (const file of files) {
      const part = partOf(file);
      if (part) this.files[part] = file;
      else ignored.push(file.name);
    }
    if (folder && !this.name.value) this.name.value = folder.replace(/[^A-Za-z0-9._-]/g, '-').replace(/^\./, '');
    this.say(ignored.length ? `Ignored ${ignored.join(', ')}: only the two adapter files are sent.` : '');
    this.update();
  }

  clear() {
    this.files = { config: null, weights: null };
    this.say('');
    this.update();
  }

  update() {
    for (const part of ['config', 'weights']) {
      const file = this.files[part];
      const cell = document.getElementById(`file-${part}`);
      cell.textContent = file ? `${file.name} · ${(file.size / 1024).toFixed(file.size < 10240 ? 1 : 0)} KiB` : 'missing';
      cell.closest('li').dataset.ready = file ? 'yes' : 'no';
    }
    const ready = this.files.config && this.files.weights;
    this.zone.dataset.state = ready ? 'ready' : this.files.config || this.files.weights ? 'partial' : 'empty';
    const nameOk = NAME_RE.test(this.name.value);
    this.name.setAttribute('aria-invalid', this.name.value && !nameOk ? 'true' : 'false');
    this.button.disabled = !(ready && nameOk) || this.busy;
  }

  say(text, kind = 'info') {
    this.status.textContent = text;
    this.status.dataset.kind = kind;
  }

  async upload() {
    const name = this.name.value.trim();
    if (!NAME_RE.test(name)) {
      this.say('The name must be 1 to 128 letters, digits, ".", "_" or "-", not starting with ".".', 'error');
      this.name.focus();
      return;
    }
    const body = new FormData();
    body.append(CONFIG, this.files.config, CONFIG);
    body.append(WEIGHTS, this.files.weights, WEIGHTS);
    this.busy = true;
    this.update();
    this.say(`Uploading ${name}…`);
    try {
      const response = await request(`/v1/adapters/${encodeURIComponent(name)}`, { method: 'PUT', body });
      const adapter = await response.json();
      const verb = response.status === 201 ? 'Uploaded' : 'Replaced';
      this.say(`${verb} ${adapter.id} (generation ${adapter.generation}).`, 'ok');
      this.files = { config: null, weights: null };
      this.dispatchEvent(new CustomEvent('uploaded', { detail: adapter }));
    } catch (e) {
      this.say(`Upload failed (${e.status || 'network'}): ${e.message}`, 'error');
    } finally {
      this.busy = false;
      this.update();
    }
  }
}
