// DOM building and formatting. Data from the server only ever becomes text nodes or attribute values,
// never markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function setProps(el, props) {
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') el.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    else if (name.startsWith('on') && typeof value === 'function') el.addEventListener(name.slice(2), value);
    else if (name === 'checked' || name === 'disabled') el[name] = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
}

/** `h('button', {class: 'primary', onclick}, 'Save')` */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  const { value, ...rest } = props ?? {};
  setProps(el, rest);
  append(el, children);
  // After the children: a select's value must name one of its options.
  if (value !== undefined && value !== null) el.value = value;
  return el;
}

export function s(tag, props, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value !== null && value !== undefined) el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// --- formatting -----------------------------------------------------------------------------------

const integer = new Intl.NumberFormat('en-US', { maximumFractionDigits: 0 });
const compact = new Intl.NumberFormat('en-US', { notation: 'compact', maximumFractionDigits: 1 });

/** Credits and counts are integers; shown with thousands separators. */
export function num(value) {
  if (value === null || value === undefined) return '—';
  return typeof value === 'number' ? integer.format(value) : String(value);
}

export function credits(value) {
  return value === null || value === undefined ? '—' : `${num(value)} cr`;
}

export function short(value) {
  return Math.abs(value) < 1000 ? integer.format(value) : compact.format(value);
}

/** `1 request`, `2 requests`. */
export function plural(n, word) {
  return `${num(n)} ${word}${n === 1 ? '' : 's'}`;
}

/** Basis points (10000 = 100 %) as a percentage with two decimals, in integer arithmetic. */
export function bps(value) {
  if (typeof value !== 'number') return '—';
  const sign = value < 0 ? '-' : '';
  const abs = Math.abs(Math.trunc(value));
  return `${sign}${Math.trunc(abs / 100)}.${String(abs % 100).padStart(2, '0')} %`;
}

/** The share `part / total` in basis points, rounded down; null when there is no total. */
export function shareBps(part, total) {
  return total > 0 ? Math.floor((part * 10000) / total) : null;
}

const pad = (n) => String(n).padStart(2, '0');

/** Times are shown in UTC, like the analytics buckets. */
export function time(ms) {
  if (ms === null || ms === undefined) return '—';
  const d = new Date(ms);
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
}

// --- inputs -----------------------------------------------------------------------------------------

/** A whole, non-negative number of credits from a form field, or an Error naming the field. */
export function parseCount(text, field, { min = 0 } = {}) {
  const trimmed = String(text ?? '')
    .replaceAll(',', '')
    .replaceAll('_', '')
    .trim();
  if (!/^\d+$/.test(trimmed)) throw new Error(`${field}: a whole number`);
  const value = Number(trimmed);
  if (!Number.isSafeInteger(value)) throw new Error(`${field}: too large`);
  if (value < min) throw new Error(`${field}: at least ${num(min)}`);
  return value;
}

export function parseList(text) {
  return String(text ?? '')
    .split(',')
    .map((item) => item.trim())
    .filter(Boolean);
}

/** A random idempotency key (crypto.randomUUID needs a secure context; this does not). */
export function randomKey(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `${prefix}-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

// --- building blocks ----------------------------------------------------------------------------

const TONES = {
  active: 'ok',
  open: 'warn',
  refunded: 'ok',
  rejected: 'muted',
  paused: 'warn',
  pending: 'warn',
  confirmed: 'bad',
  flagged: 'bad',
  depleted: 'bad',
  failing: 'bad',
  revoked: 'muted',
  expired: 'muted',
  released: 'muted',
  exhausted: 'muted',
  admin: 'info',
  seller: 'info',
  buyer: 'info',
};

/** Text cut to its column's width, shown whole on hover. */
export function clip(text, tag = 'span') {
  return h(tag, { class: 'clip', title: text ?? '' }, text ?? '—');
}

export function badge(text, tone) {
  return h('span', { class: ['badge', `badge-${tone ?? TONES[text] ?? 'muted'}`] }, text || '—');
}

export function card(title, { actions, id, subtitle } = {}, ...children) {
  return h(
    'section',
    { class: 'card', id },
    h(
      'header',
      { class: 'card-head' },
      h('div', {}, h('h2', {}, title), subtitle ? h('p', { class: 'sub' }, subtitle) : null),
      actions ? h('div', { class: 'card-actions' }, actions) : null,
    ),
    h('div', { class: 'card-body' }, children),
  );
}

export function stat(label, value, hint) {
  // Large amounts get a smaller type rather than being cut.
  const long = String(value).length > 13;
  return h(
    'div',
    { class: 'stat' },
    h('div', { class: 'stat-label' }, label),
    h('div', { class: ['stat-value', long ? 'stat-value-long' : null] }, value),
    hint ? h('div', { class: 'stat-hint' }, hint) : null,
  );
}

/**
 * A table. columns: [{label, cell: row => Node|string, num?: bool}]
 */
export function table(columns, rows, { empty = 'Nothing here yet.', testid, rowId } = {}) {
  if (!rows.length) return h('p', { class: 'empty', 'data-testid': testid }, empty);
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { 'data-testid': testid },
      h(
        'thead',
        {},
        h(
          'tr',
          {},
          columns.map((c) => h('th', { class: c.num ? 'num' : null }, c.label)),
        ),
      ),
      h(
        'tbody',
        {},
        rows.map((row) =>
          h(
            'tr',
            { 'data-id': rowId ? rowId(row) : null },
            columns.map((c) => h('td', { class: [c.num ? 'num' : null, c.nowrap ? 'nowrap' : null] }, c.cell(row))),
          ),
        ),
      ),
    ),
  );
}

export function field(label, control, hint) {
  return h(
    'label',
    { class: 'field' },
    h('span', { class: 'field-label' }, label),
    control,
    hint ? h('span', { class: 'field-hint' }, hint) : null,
  );
}

export function input(name, props = {}) {
  return h('input', { name, autocomplete: 'off', ...props });
}

export function select(name, options, props = {}) {
  return h(
    'select',
    { name, ...props },
    options.map(([value, label]) => h('option', { value }, label)),
  );
}

/** A segmented control; calls onchange(value) when another segment is chosen. */
export function segmented(options, value, onchange, label) {
  const group = h('div', { class: 'segmented', role: 'group', 'aria-label': label });
  for (const [v, text] of options) {
    const button = h('button', { type: 'button', 'data-value': v, 'aria-pressed': String(v === value) }, text);
    button.addEventListener('click', () => {
      for (const b of group.querySelectorAll('button')) b.setAttribute('aria-pressed', String(b === button));
      onchange(v);
    });
    group.append(button);
  }
  return group;
}

/** A button for an action that cannot be undone: the first click asks, a second within 4 s acts. */
export function confirmButton(label, action, { confirmLabel = 'Confirm?', testid, tone = 'danger' } = {}) {
  const button = h('button', { type: 'button', class: ['small', tone], 'data-testid': testid }, label);
  let timer = null;
  button.addEventListener('click', async () => {
    if (!timer) {
      button.textContent = confirmLabel;
      button.classList.add('armed');
      timer = setTimeout(() => {
        timer = null;
        button.textContent = label;
        button.classList.remove('armed');
      }, 4000);
      return;
    }
    clearTimeout(timer);
    timer = null;
    button.textContent = label;
    button.classList.remove('armed');
    await action(button);
  });
  return button;
}

/** A form whose submit runs `onsubmit(form)` (the page never navigates). */
export function form(props, onsubmit, ...children) {
  const el = h('form', { class: 'form', ...props }, children);
  el.addEventListener('submit', (event) => {
    event.preventDefault();
    onsubmit(el, el.querySelector('button[type=submit]'));
  });
  return el;
}
