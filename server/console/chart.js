// A small line chart on a <canvas>: a fixed window of samples, one or more series, drawn by hand
// (grid, area under the first series, lines, the latest point) at the screen's pixel density.

const PAD = { top: 16, right: 8, bottom: 6, left: 8 };

function cssVar(el, name, fallback) {
  const v = getComputedStyle(el).getPropertyValue(name).trim();
  return v || fallback;
}

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{series: number, capacity?: number, format?: (v: number) => string, base?: number}} options
   *   `series`: how many lines; `capacity`: samples kept; `format`: the axis label of the top
   *   value; `base`: 1024 for bytes, so the top is a round number of KiB, MiB, ...
   */
  constructor(canvas, { series = 1, capacity = 60, format = String, base = 10 } = {}) {
    this.canvas = canvas;
    this.capacity = capacity;
    this.format = format;
    this.base = base;
    this.data = Array.from({ length: series }, () => []);
    this.ceiling = null;
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  /** Appends one sample per series (`null` for a gap). */
  push(values) {
    values.forEach((v, i) => {
      const d = this.data[i];
      d.push(Number.isFinite(v) ? v : null);
      if (d.length > this.capacity) d.shift();
    });
    this.canvas.dataset.points = String(this.data[0].length);
    this.draw();
  }

  /** A fixed top of the y axis (a total, a budget) instead of the data's own maximum. */
  setCeiling(v) {
    this.ceiling = Number.isFinite(v) && v > 0 ? v : null;
  }

  draw() {
    const canvas = this.canvas;
    const rect = canvas.getBoundingClientRect();
    if (rect.width === 0 || rect.height === 0) return;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(rect.width * dpr);
    const hgt = Math.round(rect.height * dpr);
    if (canvas.width !== w || canvas.height !== hgt) {
      canvas.width = w;
      canvas.height = hgt;
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, rect.width, rect.height);

    const colors = [cssVar(canvas, '--chart-1', '#4f46e5'), cssVar(canvas, '--chart-2', '#f59e0b')];
    const grid = cssVar(canvas, '--chart-grid', 'rgba(127,127,127,0.2)');
    const label = cssVar(canvas, '--muted', '#667');
    const x0 = PAD.left;
    const y0 = PAD.top;
    const pw = rect.width - PAD.left - PAD.right;
    const ph = rect.height - PAD.top - PAD.bottom;

    const all = this.data.flat().filter((v) => v != null);
    const peak = all.length ? Math.max(...all) : 0;
    const top = this.ceiling ?? niceCeiling(peak, this.base);

    ctx.lineWidth = 1;
    ctx.strokeStyle = grid;
    ctx.setLineDash([3, 3]);
    for (let i = 0; i <= 3; i += 1) {
      const y = Math.round(y0 + (ph * i) / 3) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x0, y);
      ctx.lineTo(x0 + pw, y);
      ctx.stroke();
    }
    ctx.setLineDash([]);
    ctx.fillStyle = label;
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'bottom';
    ctx.textAlign = 'right';
    ctx.fillText(this.format(top), x0 + pw, y0 - 2);

    const step = pw / Math.max(1, this.capacity - 1);
    const xAt = (i, n) => x0 + pw - (n - 1 - i) * step;
    const yAt = (v) => y0 + ph - (Math.min(v, top) / top) * ph;

    this.data.forEach((d, s) => {
      const n = d.length;
      if (n === 0) return;
      const color = colors[s % colors.length];
      const runs = [];
      let run = [];
      d.forEach((v, i) => {
        if (v == null) {
          if (run.length) runs.push(run);
          run = [];
        } else {
          run.push([xAt(i, n), yAt(v)]);
        }
      });
      if (run.length) runs.push(run);
      for (const points of runs) {
        if (s === 0 && points.length > 1) {
          const fill = ctx.createLinearGradient(0, y0, 0, y0 + ph);
          fill.addColorStop(0, withAlpha(color, 0.28));
          fill.addColorStop(1, withAlpha(color, 0.02));
          ctx.beginPath();
          ctx.moveTo(points[0][0], y0 + ph);
          for (const [x, y] of points) ctx.lineTo(x, y);
          ctx.lineTo(points[points.length - 1][0], y0 + ph);
          ctx.closePath();
          ctx.fillStyle = fill;
          ctx.fill();
        }
        ctx.beginPath();
        points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y)));
        ctx.strokeStyle = color;
        ctx.lineWidth = 2;
        ctx.lineJoin = 'round';
        ctx.stroke();
      }
      const last = d[n - 1];
      if (last != null) {
        ctx.beginPath();
        ctx.arc(xAt(n - 1, n), yAt(last), 3, 0, Math.PI * 2);
        ctx.fillStyle = color;
        ctx.fill();
      }
    });
  }
}

/**
 * The first of 1, 2, 5 × 10^k at or above `v` (1 with no data), so the axis label is round; with
 * `base` 1024, the same in units of 1024^k (a round number of KiB, MiB, ...).
 */
function niceCeiling(v, base = 10) {
  if (!(v > 0)) return 1;
  if (base !== 10) {
    const unit = base ** Math.max(0, Math.floor(Math.log(v) / Math.log(base)));
    return niceCeiling(v / unit) * unit;
  }
  const mag = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) {
    if (v <= m * mag) return m * mag;
  }
  return 10 * mag;
}

/** `#rrggbb` or `rgb(...)` with an alpha. */
function withAlpha(color, alpha) {
  const hex = /^#([0-9a-f]{6})$/i.exec(color);
  if (hex) {
    const n = parseInt(hex[1], 16);
    return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
  }
  const rgb = /^rgba?\(([^)]+)\)$/.exec(color);
  if (rgb) {
    const [r, g, b] = rgb[1].split(',').map((x) => x.trim());
    return `rgba(${r}, ${g}, ${b}, ${alpha})`;
  }
  return color;
}
