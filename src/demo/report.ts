/**
 * The demo's report: one self-contained HTML file (grids as embedded base64 PNGs drawn with crisp
 * pixels, the loss curves as inline SVG, the metrics as a table), readable offline in any browser.
 *
 * @packageDocumentation
 */
import { encodeImage } from '../sample/images';
import type { RgbImage } from '../train/images';

/** A labelled grid of pictures: `rows` × `columns` cells of one size. */
export interface ReportGrid {
  title: string;
  image: RgbImage;
  /** Row labels (left of the grid), e.g. the prompts. */
  rowLabels?: string[];
  /** A line under the grid. */
  caption?: string;
}

/** A group of grids shown side by side (e.g. base model | with the delta). */
export interface ReportFigure {
  title: string;
  text?: string;
  grids: ReportGrid[];
}

/** One loss curve (per optimizer step). */
export interface ReportCurve {
  label: string;
  values: number[];
  colour: string;
}

/** A table: header and rows of cells (already formatted). */
export interface ReportTable {
  title: string;
  text?: string;
  header: string[];
  rows: string[][];
  /** Notes under the table. */
  notes?: string[];
}

export interface ReportContents {
  title: string;
  /** Paragraphs under the title (plain text; escaped). */
  intro: string[];
  figures: ReportFigure[];
  curves: { title: string; text?: string; curves: ReportCurve[] };
  tables: ReportTable[];
  /** Key/value facts (model, timings, files). */
  facts: [string, string][];
}

/** Escapes text for HTML. */
export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

/** Nearest-neighbour enlargement by an integer factor (small pictures stay crisp in PNG files). */
export function upscaleImage(img: RgbImage, factor: number): RgbImage {
  if (factor === 1) return img;
  const W = img.width * factor;
  const H = img.height * factor;
  const data = Buffer.alloc(W * H * 3);
  for (let y = 0; y < H; y++) {
    const sy = Math.floor(y / factor);
    for (let x = 0; x < W; x++) {
      const s = (sy * img.width + Math.floor(x / factor)) * 3;
      const o = (y * W + x) * 3;
      data[o] = img.data[s];
      data[o + 1] = img.data[s + 1];
      data[o + 2] = img.data[s + 2];
    }
  }
  return { width: W, height: H, data };
}

/** Means over a sliding window of `k` values (shorter at the start). */
export function movingAverage(values: readonly number[], k: number): number[] {
  const out: number[] = [];
  let sum = 0;
  for (let i = 0; i < values.length; i++) {
    sum += values[i];
    if (i >= k) sum -= values[i - k];
    out.push(sum / Math.min(i + 1, k));
  }
  return out;
}

/**
 * An SVG line chart of loss curves: each curve's raw values faint, a moving average (window of
 * about 5% of the steps) solid, axes with step and loss ticks.
 */
export function lossCurveSvg(curves: readonly ReportCurve[], width = 640, height = 260): string {
  const pad = { left: 52, right: 12, top: 12, bottom: 34 };
  const finite = curves.flatMap((c) => c.values.filter((v) => Number.isFinite(v)));
  const steps = Math.max(1, ...curves.map((c) => c.values.length));
  const parts: string[] = [];
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="training loss">`);
  parts.push(`<rect x="0" y="0" width="${width}" height="${height}" fill="#fff"/>`);
  if (finite.length === 0) {
    parts.push(`<text x="${width / 2}" y="${height / 2}" text-anchor="middle" font-size="13">no training steps</text></svg>`);
    return parts.join('');
  }
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (hi - lo < 1e-9) {
    hi += 0.5;
    lo -= 0.5;
  }
  lo = Math.max(0, lo - 0.05 * (hi - lo));
  const pw = width - pad.left - pad.right;
  const ph = height - pad.top - pad.bottom;
  const x = (i: number) => pad.left + (steps <= 1 ? pw / 2 : (i / (steps - 1)) * pw);
  const y = (v: number) => pad.top + ph - ((v - lo) / (hi - lo)) * ph;
  const fmt = (v: number) => v.toFixed(1);
  // Axes and ticks.
  parts.push(`<g stroke="#999" stroke-width="1"><line x1="${pad.left}" y1="${pad.top}" x2="${pad.left}" y2="${pad.top + ph}"/><line x1="${pad.left}" y1="${pad.top + ph}" x2="${pad.left + pw}" y2="${pad.top + ph}"/></g>`);
  parts.push('<g font-size="11" fill="#444" font-family="sans-serif">');
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    parts.push(`<line x1="${pad.left - 4}" y1="${fmt(y(v))}" x2="${pad.left + pw}" y2="${fmt(y(v))}" stroke="#eee"/>`);
    parts.push(`<text x="${pad.left - 6}" y="${fmt(y(v) + 4)}" text-anchor="end">${v.toPrecision(3)}</text>`);
  }
  for (const i of new Set([0, 1, 2, 3, 4].map((k) => Math.round(((steps - 1) * k) / 4)))) {
    parts.push(`<text x="${fmt(x(i))}" y="${pad.top + ph + 16}" text-anchor="middle">${i + 1}</text>`);
  }
  parts.push(`<text x="${pad.left + pw / 2}" y="${height - 4}" text-anchor="middle">optimizer step</text>`);
  parts.push('</g>');
  const path = (values: number[]) =>
    values
      .map((v, i) => (Number.isFinite(v) ? `${fmt(x(i))},${fmt(y(v))}` : ''))
      .filter(Boolean)
      .join(' ');
  const window = Math.max(1, Math.round(steps / 20));
  curves.forEach((c, k) => {
    parts.push(`<polyline fill="none" stroke="${c.colour}" stroke-opacity="0.25" stroke-width="1" points="${path(c.values)}"/>`);
    parts.push(`<polyline fill="none" stroke="${c.colour}" stroke-width="2" points="${path(movingAverage(c.values, window))}"/>`);
    const ly = pad.top + 14 + 16 * k;
    parts.push(
      `<g font-size="12" font-family="sans-serif"><line x1="${pad.left + pw - 190}" y1="${ly - 4}" x2="${pad.left + pw - 170}" y2="${ly - 4}" stroke="${c.colour}" stroke-width="2"/>` +
        `<text x="${pad.left + pw - 164}" y="${ly}">${escapeHtml(c.label)}</text></g>`,
    );
  });
  parts.push('</svg>');
  return parts.join('');
}

async function gridHtml(g: ReportGrid, scale: number): Promise<string> {
  const png = (await encodeImage(g.image, 'png')).toString('base64');
  const img = `<img alt="${escapeHtml(g.title)}" width="${g.image.width * scale}" height="${g.image.height * scale}" src="data:image/png;base64,${png}">`;
  let body = img;
  if (g.rowLabels && g.rowLabels.length > 0) {
    const rowHeight = (g.image.height * scale) / g.rowLabels.length;
    const labels = g.rowLabels.map((l) => `<div style="height:${rowHeight.toFixed(2)}px">${escapeHtml(l)}</div>`).join('');
    body = `<div class="labelled"><div class="rows">${labels}</div>${img}</div>`;
  }
  return `<figure><figcaption>${escapeHtml(g.title)}</figcaption>${body}${g.caption ? `<p class="small">${escapeHtml(g.caption)}</p>` : ''}</figure>`;
}

const STYLE = `
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
img { image-rendering: pixelated; image-rendering: crisp-edges; border: 1px solid #ccc; }
.figures { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; font-size: 0.95em; }
.labelled { display: flex; } .rows { display: flex; flex-direction: column; font-size: 0.78em; color: #555; margin-right: 6px; text-align: right; }
.rows div { display: flex; align-items: center; justify-content: flex-end; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; } th, td { border: 1px solid #ddd; padding: 4px 9px; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f4f4f4; }
.small { font-size: 0.85em; color: #555; margin: 4px 0; } dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; font-size: 0.9em; }
dt { color: #555; } dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
code { font-family: ui-monospace, monospace; }
`;

/** Renders the report as one HTML document. `scale` enlarges the pictures on screen (default 3). */
export async function renderReportHtml(c: ReportContents, scale = 3): Promise<string> {
  const out: string[] = [];
  out.push('<!doctype html><html lang="en"><head><meta charset="utf-8">');
  out.push(`<meta name="viewport" content="width=device-width, initial-scale=1"><title>${escapeHtml(c.title)}</title><style>${STYLE}</style></head><body>`);
  out.push(`<h1>${escapeHtml(c.title)}</h1>`);
  for (const p of c.intro) out.push(`<p>${escapeHtml(p)}</p>`);
  for (const f of c.figures) {
    out.push(`<h2>${escapeHtml(f.title)}</h2>`);
    if (f.text) out.push(`<p>${escapeHtml(f.text)}</p>`);
    const grids = await Promise.all(f.grids.map((g) => gridHtml(g, scale)));
    out.push(`<div class="figures">${grids.join('')}</div>`);
  }
  out.push(`<h2>${escapeHtml(c.curves.title)}</h2>`);
  if (c.curves.text) out.push(`<p>${escapeHtml(c.curves.text)}</p>`);
  out.push(`<div class="curve">${lossCurveSvg(c.curves.curves)}</div>`);
  for (const t of c.tables) {
    out.push(`<h2>${escapeHtml(t.title)}</h2>`);
    if (t.text) out.push(`<p>${escapeHtml(t.text)}</p>`);
    out.push('<table class="metrics"><thead><tr>');
    out.push(t.header.map((h) => `<th>${escapeHtml(h)}</th>`).join(''));
    out.push('</tr></thead><tbody>');
    for (const r of t.rows) out.push(`<tr>${r.map((v) => `<td>${escapeHtml(v)}</td>`).join('')}</tr>`);
    out.push('</tbody></table>');
    for (const n of t.notes ?? []) out.push(`<p class="small">${escapeHtml(n)}</p>`);
  }
  out.push('<h2>Run</h2><dl>');
  for (const [k, v] of c.facts) out.push(`<dt>${escapeHtml(k)}</dt><dd>${escapeHtml(v)}</dd>`);
  out.push('</dl></body></html>\n');
  return out.join('\n');
}
