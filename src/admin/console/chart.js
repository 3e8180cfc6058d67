// Small SVG charts: a time series (bars or lines) with axes and labels, and a horizontal bar list.
// Tooltips are SVG <title> elements, which every browser shows on hover without any script.

import { h, s, short } from './dom.js';

const W = 1000;
const H = 300;
const M = { top: 16, right: 16, bottom: 34, left: 64 };
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** A step of 1, 2 or 5 times a power of ten, whole for whole data, so that about four gridlines fit. */
function niceStep(max, lines = 4) {
  const raw = Math.max(max / lines, 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  const f = raw / power;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * power;
}

function dayLabel(d) {
  return `${MONTHS[d.getUTCMonth()]} ${d.getUTCDate()}`;
}

/** An axis label; hourly labels name the day where it changes from the previous label. */
function bucketLabel(t, granularity, previous) {
  const d = new Date(t);
  if (granularity === 'day') return dayLabel(d);
  const hour = `${String(d.getUTCHours()).padStart(2, '0')}:00`;
  const newDay = previous === undefined || new Date(previous).getUTCDate() !== d.getUTCDate();
  return newDay ? `${dayLabel(d)} ${hour}` : hour;
}

function bucketTitle(t, granularity) {
  const d = new Date(t);
  if (granularity === 'day') return `${dayLabel(d)}, ${d.getUTCFullYear()} (UTC)`;
  return `${dayLabel(d)} ${String(d.getUTCHours()).padStart(2, '0')}:00 UTC`;
}

function legend(series) {
  return h(
    'div',
    { class: 'legend' },
    series.map((item, i) =>
      h('span', { class: 'legend-item' }, h('span', { class: ['swatch', `series-${i}`] }), item.label),
    ),
  );
}

/**
 * A time series chart.
 * @param {{points: Array<object>, series: Array<{key: string, label: string}>, kind?: 'bar'|'line',
 *          granularity: 'hour'|'day', format?: (v: number) => string, testid?: string, title?: string}} o
 */
export function timeChart({ points, series, kind = 'line', granularity, format = String, testid, title }) {
  const plotW = W - M.left - M.right;
  const plotH = H - M.top - M.bottom;
  const n = Math.max(points.length, 1);
  const band = plotW / n;
  const max = Math.max(0, ...points.flatMap((p) => series.map((item) => Number(p[item.key]) || 0)));
  const step = niceStep(max);
  const top = Math.max(step, Math.ceil(max / step) * step);
  const x = (i) => M.left + (i + 0.5) * band;
  const y = (v) => M.top + plotH - (v / top) * plotH;

  const svg = s('svg', {
    class: ['chart', `chart-${kind}`].join(' '),
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
    'aria-label': title ?? series.map((item) => item.label).join(', '),
    'data-points': points.length,
  });

  // Gridlines and y labels.
  const grid = s('g', { class: 'grid' });
  for (let v = 0; v <= top + step / 2; v += step) {
    grid.append(s('line', { x1: M.left, x2: W - M.right, y1: y(v), y2: y(v) }));
    grid.append(s('text', { x: M.left - 8, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, short(v)));
  }
  svg.append(grid);

  // X labels: at most about eight, evenly spaced.
  const every = Math.ceil(n / 8);
  const xAxis = s('g', { class: 'x-axis' });
  xAxis.append(s('line', { x1: M.left, x2: W - M.right, y1: M.top + plotH, y2: M.top + plotH, class: 'axis' }));
  let previous;
  points.forEach((p, i) => {
    if (i % every !== 0) return;
    xAxis.append(s('line', { x1: x(i), x2: x(i), y1: M.top + plotH, y2: M.top + plotH + 4, class: 'axis' }));
    xAxis.append(
      s(
        'text',
        { x: x(i), y: H - 10, 'text-anchor': 'middle', class: 'tick' },
        bucketLabel(p.t, granularity, previous),
      ),
    );
    previous = p.t;
  });
  svg.append(xAxis);

  const data = s('g', { class: 'data' });
  if (kind === 'bar') {
    const groupW = Math.max(band * 0.72, 1);
    const barW = groupW / series.length;
    points.forEach((p, i) => {
      series.forEach((item, j) => {
        const v = Number(p[item.key]) || 0;
        if (v <= 0) return;
        const bx = x(i) - groupW / 2 + j * barW;
        data.append(
          s('rect', {
            x: bx,
            y: y(v),
            width: Math.max(barW - 1, 0.8),
            height: M.top + plotH - y(v),
            class: `bar series-${j}`,
            rx: Math.min(2, barW / 4),
          }),
        );
      });
    });
  } else {
    series.forEach((item, j) => {
      const coords = points.map((p, i) => [x(i), y(Number(p[item.key]) || 0)]);
      if (!coords.length) return;
      const line = coords.map(([px, py], i) => `${i ? 'L' : 'M'}${px.toFixed(1)} ${py.toFixed(1)}`).join(' ');
      if (j === 0) {
        const base = (M.top + plotH).toFixed(1);
        data.append(
          s('path', {
            d: `${line} L${coords.at(-1)[0].toFixed(1)} ${base} L${coords[0][0].toFixed(1)} ${base} Z`,
            class: `area series-${j}`,
          }),
        );
      }
      data.append(s('path', { d: line, class: `line series-${j}` }));
      points.forEach((p, i) => {
        if ((Number(p[item.key]) || 0) > 0)
          data.append(s('circle', { cx: coords[i][0], cy: coords[i][1], r: 3, class: `dot series-${j}` }));
      });
    });
  }
  svg.append(data);

  // One hover band per bucket, titled with every series' value.
  const hover = s('g', { class: 'hover' });
  points.forEach((p, i) => {
    const lines = [
      bucketTitle(p.t, granularity),
      ...series.map((item) => `${item.label}: ${format(Number(p[item.key]) || 0)}`),
    ];
    hover.append(
      s('rect', { x: M.left + i * band, y: M.top, width: band, height: plotH }, s('title', {}, lines.join('\n'))),
    );
  });
  svg.append(hover);

  if (max === 0) {
    svg.append(
      s(
        'text',
        { x: M.left + plotW / 2, y: M.top + plotH / 2, 'text-anchor': 'middle', class: 'chart-empty' },
        'No activity in this period',
      ),
    );
  }
  return h(
    'figure',
    { class: 'chart-figure', 'data-testid': testid },
    svg,
    series.length > 1 || kind === 'line' ? legend(series) : null,
  );
}

/**
 * Horizontal bars, one per item in the order given: HTML rows (so labels keep their size at any width), each
 * bar a small SVG stretched to its row.
 * @param {Array<{label: string, value: number}>} items
 */
export function barList(items, { format = String, testid, empty = 'No data yet.' } = {}) {
  if (!items.length) return h('p', { class: 'empty', 'data-testid': testid }, empty);
  const max = Math.max(1, ...items.map((item) => item.value));
  return h(
    'div',
    { class: 'bar-list', 'data-testid': testid },
    items.map((item) => {
      const share = (item.value / max) * 100;
      const bar = s(
        'svg',
        { class: 'bar-track', viewBox: '0 0 100 10', preserveAspectRatio: 'none', 'aria-hidden': 'true' },
        s('rect', { x: 0, y: 0, width: 100, height: 10, class: 'track' }),
        s('rect', { x: 0, y: 0, width: Math.max(share, item.value > 0 ? 0.5 : 0), height: 10, class: 'bar' }),
      );
      return h(
        'div',
        { class: 'bar-row', title: `${item.label}: ${format(item.value)}` },
        h('span', { class: 'bar-label' }, item.label),
        bar,
        h('span', { class: 'bar-value' }, format(item.value)),
      );
    }),
  );
}
