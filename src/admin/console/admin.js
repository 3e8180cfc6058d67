// Admin views: the platform report, flagged-key review, the fallback pool, prices, disputes, users.

import {
  h,
  plural,
  clip,
  card,
  stat,
  table,
  field,
  input,
  select,
  form,
  badge,
  confirmButton,
  segmented,
  num,
  credits,
  time,
  bps,
  parseCount,
  parseList,
  randomKey,
} from './dom.js';
import { usageCard, exportButtons } from './usage.js';
import { health, statusCell } from './seller.js';

async function report(ctx, view, tools) {
  const days = Number(sessionStorage.getItem('tokex.report-days') ?? 7);
  const [data, chart] = await Promise.all([
    ctx.api.call('analytics_platform', { query: { days } }),
    usageCard(ctx, {
      scope: 'platform',
      metrics: ['requests', 'spend', 'fees', 'tokens'],
      granularity: 'day',
      title: 'Platform activity',
      testid: 'platform-chart',
    }),
  ]);
  const { orders, recent, keys, fallback, disputes } = data;
  const windowPicker = segmented(
    [
      ['7', '7 days'],
      ['30', '30 days'],
      ['90', '90 days'],
    ],
    String(data.window_days),
    (value) => {
      sessionStorage.setItem('tokex.report-days', value);
      ctx.refresh();
    },
    'Window',
  );
  tools.append(exportButtons(ctx, 'platform'));
  const byStatus = Object.entries(keys.by_status ?? {}).sort(([a], [b]) => a.localeCompare(b));
  view.append(
    h(
      'div',
      { class: 'report-head' },
      h(
        'p',
        { class: 'sub' },
        `Generated ${time(data.generated_at_ms)} UTC. Volume, transactions, requests, tokens and revenue cover the last ${num(data.window_days)} days.`,
      ),
      windowPicker,
    ),
    h(
      'div',
      { class: 'stats', 'data-testid': 'platform-report' },
      stat('Orders (escrows)', num(orders.total), `${num(orders.active)} active · ${num(orders.completed)} completed`),
      stat('Dispute rate', bps(orders.dispute_rate_bps), plural(orders.disputed, 'disputed order')),
      stat(
        `Volume, ${num(data.window_days)} days`,
        credits(recent.volume_credits),
        plural(recent.transactions, 'transaction'),
      ),
      stat('Requests', num(recent.requests), plural(recent.tokens, 'token')),
      stat('Platform revenue', credits(recent.platform_credits), `last ${num(data.window_days)} days`),
      stat(
        'Fallback share',
        bps(fallback.share_bps),
        `${num(fallback.requests)} of ${num(fallback.total_requests)} requests`,
      ),
      stat(
        'Active seller keys',
        num(keys.active),
        h(
          'span',
          { class: 'badges' },
          byStatus.map(([st, n]) => badge(`${st} ${num(n)}`, badgeTone(st))),
        ),
      ),
      stat(
        'Disputes',
        `${num(disputes.open)} open`,
        `${num(disputes.refunded)} refunded (${credits(disputes.refunded_credits)}) · ${num(disputes.rejected)} rejected`,
      ),
    ),
    chart,
    card(
      'By model',
      { subtitle: 'All time, most requested first.' },
      table(
        [
          { label: 'Model', cell: (m) => h('code', {}, m.model) },
          { label: 'Requests', num: true, cell: (m) => num(m.requests) },
          { label: 'Failed', num: true, cell: (m) => num(m.failed_requests) },
          { label: 'Prompt tokens', num: true, cell: (m) => num(m.prompt_tokens) },
          { label: 'Completion tokens', num: true, cell: (m) => num(m.completion_tokens) },
          { label: 'Billed', num: true, cell: (m) => credits(m.cost_credits) },
          { label: 'Platform', num: true, cell: (m) => credits(m.platform_credits) },
          { label: 'Fallback', num: true, cell: (m) => num(m.fallback_requests) },
        ],
        data.by_model ?? [],
        { empty: 'No traffic yet.', testid: 'by-model' },
      ),
    ),
  );
}

function badgeTone(status) {
  return { active: 'ok', paused: 'warn', flagged: 'bad', depleted: 'bad' }[status] ?? 'muted';
}

async function reviews(ctx, view) {
  const { reviews: list } = await ctx.api.call('admin_reviews_list');
  const act = (r, action, button, note) =>
    ctx.run(
      async () => {
        const body = { action };
        if (note.value.trim()) body.note = note.value.trim();
        await ctx.api.call('admin_key_review', { params: { id: r.key.id }, body });
        await ctx.refresh();
      },
      {
        button,
        success:
          action === 'clear'
            ? `Key #${r.key.id} cleared: it is routed again.`
            : `Dilution on key #${r.key.id} confirmed: it stays out of routing.`,
      },
    );
  view.append(
    card(
      'Waiting for review',
      { subtitle: 'Risk control flagged these keys: their provider balance dropped more than the platform metered.' },
      table(
        [
          {
            label: 'Key',
            cell: (r) =>
              h(
                'div',
                { class: 'stack' },
                h('strong', {}, r.key.name || `#${r.key.id}`),
                h('span', { class: 'muted small' }, `#${r.key.id} · ${r.key.provider} · ${r.key.key_hint}`),
              ),
          },
          { label: 'Owner', cell: (r) => r.owner_username ?? `user #${r.key.owner_id}` },
          {
            label: 'Why',
            cell: (r) =>
              h(
                'div',
                { class: 'stack' },
                clip(r.reason ?? '—'),
                h('span', { class: 'muted small' }, time(r.flagged_at_ms)),
              ),
          },
          { label: 'Latest sample', cell: (r) => sample(r.samples?.[0]) },
          { label: 'Review', cell: (r) => badge(r.key.review || 'pending') },
          {
            label: 'Decision',
            cell: (r) => {
              const note = input('note', { placeholder: 'note (optional)', class: 'compact' });
              return h(
                'div',
                { class: 'actions' },
                note,
                h(
                  'button',
                  {
                    type: 'button',
                    class: 'small danger',
                    'data-testid': `confirm-${r.key.id}`,
                    onclick: (e) => act(r, 'confirm', e.currentTarget, note),
                  },
                  'Confirm',
                ),
                h(
                  'button',
                  {
                    type: 'button',
                    class: 'small primary',
                    'data-testid': `clear-${r.key.id}`,
                    onclick: (e) => act(r, 'clear', e.currentTarget, note),
                  },
                  'Clear',
                ),
              );
            },
          },
        ],
        list,
        { empty: 'No key is waiting for review.', testid: 'reviews', rowId: (r) => r.key.id },
      ),
    ),
  );
}

function sample(s) {
  if (!s) return h('span', { class: 'muted' }, '—');
  return h(
    'div',
    { class: 'stack' },
    h(
      'span',
      { class: 'nowrap', title: `metered ${num(s.metered_credits)} credits since the previous sample` },
      credits(s.balance_credits),
    ),
    h('span', { class: 'muted small nowrap' }, `${s.verdict} · excess ${num(s.excess_credits)}`),
  );
}

async function fallbackPool(ctx, view) {
  const { keys: list } = await ctx.api.call('admin_fallback_keys_list');
  const toggle = (k) => {
    if (k.status !== 'active' && k.status !== 'paused') return null;
    const next = k.status === 'active' ? 'paused' : 'active';
    return h(
      'button',
      {
        type: 'button',
        class: ['small', next === 'paused' ? 'secondary' : 'primary'],
        'data-testid': `fallback-${next === 'paused' ? 'pause' : 'resume'}-${k.id}`,
        onclick: (e) =>
          ctx.run(
            async () => {
              await ctx.api.call('admin_fallback_keys_update', { params: { id: k.id }, body: { status: next } });
              await ctx.refresh();
            },
            { button: e.currentTarget, success: `Fallback key #${k.id} ${next === 'paused' ? 'paused' : 'resumed'}.` },
          ),
      },
      next === 'paused' ? 'Pause' : 'Resume',
    );
  };
  const name = input('name', { maxlength: 100, placeholder: 'e.g. platform-openai' });
  const provider = select('provider', [
    ['openai', 'OpenAI'],
    ['deepseek', 'DeepSeek'],
    ['openrouter', 'OpenRouter'],
    ['moonshot', 'Moonshot'],
    ['siliconflow', 'SiliconFlow'],
  ]);
  const baseUrl = input('base_url', { required: true, type: 'url', placeholder: 'https://api.openai.com/v1' });
  const models = input('models', { required: true, placeholder: 'gpt-4o-mini' });
  const apiKey = input('api_key', {
    required: true,
    type: 'password',
    autocomplete: 'new-password',
    placeholder: 'sk-…',
  });
  const priority = input('priority', { inputmode: 'numeric', placeholder: '0 = first' });
  const balance = input('declared_balance', { inputmode: 'numeric', placeholder: '0 = unknown' });
  const add = form(
    { 'data-testid': 'add-fallback' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = {
            provider: provider.value,
            base_url: baseUrl.value.trim(),
            models: parseList(models.value),
            api_key: apiKey.value.trim(),
          };
          if (name.value.trim()) body.name = name.value.trim();
          if (priority.value.trim()) body.priority = parseCount(priority.value, 'priority');
          if (balance.value.trim()) body.declared_balance = parseCount(balance.value, 'declared balance');
          const key = await ctx.api.call('admin_fallback_keys_create', { body });
          apiKey.value = '';
          await ctx.refresh();
          ctx.ok(`Fallback key #${key.id} added.`);
        },
        { button },
      ),
    h('div', { class: 'row' }, field('Name', name), field('Provider', provider), field('Base URL', baseUrl)),
    h(
      'div',
      { class: 'row' },
      field('Models', models, 'Comma-separated'),
      field('API key', apiKey),
      field('Priority', priority, 'Lower is tried first'),
      field('Declared balance', balance),
    ),
    h('button', { type: 'submit', class: 'primary' }, 'Verify and add'),
  );
  view.append(
    card(
      'Platform keys',
      { subtitle: 'Platform keys, tried in priority order when no seller key can serve a request.' },
      table(
        [
          { label: 'Priority', num: true, cell: (k) => num(k.priority) },
          {
            label: 'Key',
            cell: (k) =>
              h(
                'div',
                { class: 'stack' },
                h('strong', {}, k.name || `#${k.id}`),
                h('span', { class: 'muted small' }, `${k.provider} · ${k.key_hint}`),
              ),
          },
          { label: 'Models', cell: (k) => clip(k.models.join(', ')) },
          { label: 'Status', cell: statusCell },
          { label: 'Health', cell: health },
          { label: 'Remaining', num: true, cell: (k) => credits(k.remaining_balance) },
          { label: 'Last used (UTC)', nowrap: true, cell: (k) => time(k.last_used_at_ms) },
          { label: '', cell: toggle },
        ],
        list,
        { empty: 'No fallback keys.', testid: 'fallback-keys', rowId: (k) => k.id },
      ),
    ),
    card('Add a fallback key', {}, add),
  );
}

async function prices(ctx, view) {
  const list = await ctx.api.call('prices_list');
  const model = input('model', { required: true, maxlength: 200, placeholder: 'gpt-4o-mini' });
  const prompt = input('prompt_per_million', { required: true, inputmode: 'numeric', placeholder: '150,000' });
  const completion = input('completion_per_million', { required: true, inputmode: 'numeric', placeholder: '600,000' });
  const maxOutput = input('max_output_tokens', { inputmode: 'numeric', placeholder: 'default' });
  const set = form(
    { 'data-testid': 'set-price' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = {
            prompt_per_million: parseCount(prompt.value, 'prompt price'),
            completion_per_million: parseCount(completion.value, 'completion price'),
          };
          if (maxOutput.value.trim())
            body.max_output_tokens = parseCount(maxOutput.value, 'max output tokens', { min: 1 });
          const price = await ctx.api.call('admin_prices_set', { params: { model: model.value.trim() }, body });
          await ctx.refresh();
          ctx.ok(`Price of ${price.model} set.`);
        },
        { button },
      ),
    h(
      'div',
      { class: 'row' },
      field('Model', model),
      field('Prompt (credits / 1M tokens)', prompt),
      field('Completion (credits / 1M tokens)', completion),
      field('Max output tokens', maxOutput),
    ),
    h('button', { type: 'submit', class: 'primary' }, 'Set price'),
  );
  const edit = (p) => {
    model.value = p.model;
    prompt.value = String(p.prompt_per_million);
    completion.value = String(p.completion_per_million);
    maxOutput.value = String(p.max_output_tokens);
    prompt.focus();
  };
  view.append(
    card(
      'Set a price',
      { subtitle: 'A model is served only once it has a price. Requests cost ⌈tokens × price / 10⁶⌉ credits.' },
      set,
    ),
    card(
      'Price list',
      {},
      table(
        [
          { label: 'Model', cell: (p) => h('code', {}, p.model) },
          { label: 'Prompt / 1M', num: true, cell: (p) => credits(p.prompt_per_million) },
          { label: 'Completion / 1M', num: true, cell: (p) => credits(p.completion_per_million) },
          { label: 'Max output tokens', num: true, cell: (p) => num(p.max_output_tokens) },
          {
            label: '',
            cell: (p) =>
              h(
                'div',
                { class: 'actions' },
                h('button', { type: 'button', class: 'small secondary', onclick: () => edit(p) }, 'Edit'),
                confirmButton(
                  'Delete',
                  (button) =>
                    ctx.run(
                      async () => {
                        await ctx.api.call('admin_prices_delete', { params: { model: p.model } });
                        await ctx.refresh();
                      },
                      { button, success: `${p.model} is no longer served.` },
                    ),
                  { confirmLabel: 'Stop serving?' },
                ),
              ),
          },
        ],
        list,
        { empty: 'No model has a price: none is served.', testid: 'prices', rowId: (p) => p.model },
      ),
    ),
  );
}

async function disputes(ctx, view) {
  const status = sessionStorage.getItem('tokex.dispute-filter') ?? 'open';
  const [{ disputes: list }, { users }] = await Promise.all([
    ctx.api.call('admin_disputes_list', { query: { status: status === 'all' ? undefined : status } }),
    ctx.api.call('admin_users_list'),
  ]);
  const names = new Map(users.map((u) => [u.id, u.username]));
  const filter = segmented(
    [
      ['open', 'Open'],
      ['refunded', 'Refunded'],
      ['rejected', 'Rejected'],
      ['all', 'All'],
    ],
    status,
    (value) => {
      sessionStorage.setItem('tokex.dispute-filter', value);
      ctx.refresh();
    },
    'Status',
  );
  const resolve = (d, outcome, button, note) =>
    ctx.run(
      async () => {
        const body = { outcome };
        if (note.value.trim()) body.note = note.value.trim();
        const done = await ctx.api.call('admin_disputes_resolve', { params: { id: d.id }, body });
        await ctx.refresh();
        ctx.ok(
          outcome === 'refund'
            ? `Dispute #${d.id} refunded: ${credits(done.refunded_credits)} back to the buyer.`
            : `Dispute #${d.id} rejected.`,
        );
      },
      { button },
    );
  view.append(
    card(
      'Buyer disputes',
      {
        actions: filter,
        subtitle: 'A refund reverses the disputed settlement: seller and platform give back what they earned.',
      },
      table(
        [
          { label: '#', cell: (d) => `#${d.id}` },
          { label: 'Buyer', cell: (d) => names.get(d.buyer_id) ?? `user #${d.buyer_id}` },
          {
            label: 'About',
            cell: (d) => (d.target_kind === 'escrow' ? `Escrow #${d.escrow_id}` : clip(d.request_id ?? '—', 'code')),
          },
          { label: 'Reason', cell: (d) => clip(d.reason) },
          { label: 'Opened (UTC)', nowrap: true, cell: (d) => time(d.created_at_ms) },
          {
            label: 'Status',
            cell: (d) =>
              h(
                'div',
                { class: 'stack' },
                badge(d.status),
                d.status === 'refunded' ? h('span', { class: 'muted small' }, credits(d.refunded_credits)) : null,
              ),
          },
          {
            label: 'Resolution',
            cell: (d) => {
              if (d.status !== 'open') {
                const by = names.get(d.resolved_by) ?? (d.resolved_by ? `user #${d.resolved_by}` : 'the platform');
                return h(
                  'div',
                  { class: 'stack' },
                  clip(d.resolution_note || '—'),
                  h('span', { class: 'muted small nowrap' }, `${by} · ${time(d.resolved_at_ms)}`),
                );
              }
              const note = input('note', { placeholder: 'note (optional)', class: 'compact' });
              return h(
                'div',
                { class: 'actions' },
                note,
                h(
                  'button',
                  {
                    type: 'button',
                    class: 'small primary',
                    'data-testid': `refund-${d.id}`,
                    onclick: (e) => resolve(d, 'refund', e.currentTarget, note),
                  },
                  'Refund',
                ),
                h(
                  'button',
                  {
                    type: 'button',
                    class: 'small secondary',
                    'data-testid': `reject-${d.id}`,
                    onclick: (e) => resolve(d, 'reject', e.currentTarget, note),
                  },
                  'Reject',
                ),
              );
            },
          },
        ],
        list,
        {
          empty: status === 'open' ? 'No open disputes.' : 'No disputes.',
          testid: 'admin-disputes',
          rowId: (d) => d.id,
        },
      ),
    ),
  );
}

async function users(ctx, view) {
  const { users: list } = await ctx.api.call('admin_users_list');
  const username = input('username', { required: true, maxlength: 64 });
  const password = input('password', { required: true, type: 'password', autocomplete: 'new-password' });
  const roles = ['buyer', 'seller', 'admin'].map((role) =>
    h('input', { type: 'checkbox', name: 'roles', value: role, checked: role === 'buyer' }),
  );
  const create = form(
    { 'data-testid': 'create-user' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = {
            username: username.value.trim(),
            password: password.value,
            roles: roles.filter((r) => r.checked).map((r) => r.value),
          };
          const created = await ctx.api.call('admin_users_create', { body });
          password.value = '';
          await ctx.refresh();
          ctx.ok(`User ${created.username} created.`);
        },
        { button },
      ),
    h(
      'div',
      { class: 'row' },
      field('Username', username),
      field('Password', password),
      h(
        'fieldset',
        { class: 'field' },
        h('legend', { class: 'field-label' }, 'Roles'),
        h(
          'div',
          { class: 'checks' },
          roles.map((r) => h('label', { class: 'check' }, r, r.value)),
        ),
      ),
    ),
    h('button', { type: 'submit', class: 'primary' }, 'Create user'),
  );

  const who = select(
    'user',
    list.map((u) => [String(u.id), `${u.username} (#${u.id})`]),
  );
  const amount = input('amount', { required: true, inputmode: 'numeric', placeholder: '1,000,000' });
  const memo = input('memo', { maxlength: 200, placeholder: 'optional' });
  // One idempotency key per intended grant: a retried click cannot grant twice.
  let grantKey = randomKey('console-grant');
  const grant = form(
    { 'data-testid': 'grant-credits' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = { amount: parseCount(amount.value, 'amount', { min: 1 }), idempotency_key: grantKey };
          if (memo.value.trim()) body.memo = memo.value.trim();
          const granted = await ctx.api.call('admin_credits_grant', { params: { id: who.value }, body });
          grantKey = randomKey('console-grant');
          amount.value = '';
          ctx.ok(`${credits(granted.amount)} granted; the wallet now holds ${credits(granted.balance)}.`);
        },
        { button },
      ),
    h('div', { class: 'row' }, field('User', who), field('Amount (credits)', amount), field('Memo', memo)),
    h('button', { type: 'submit', class: 'primary' }, 'Grant credits'),
  );
  for (const control of [who, amount]) control.addEventListener('input', () => (grantKey = randomKey('console-grant')));

  view.append(
    card(
      'All users',
      {},
      table(
        [
          { label: '#', cell: (u) => `#${u.id}` },
          { label: 'Username', cell: (u) => h('strong', {}, u.username) },
          {
            label: 'Roles',
            cell: (u) =>
              h(
                'span',
                { class: 'badges' },
                u.roles.map((r) => badge(r)),
              ),
          },
          { label: 'State', cell: (u) => (u.disabled ? badge('disabled', 'bad') : badge('enabled', 'ok')) },
          { label: 'Created (UTC)', nowrap: true, cell: (u) => time(u.created_at_ms) },
        ],
        list,
        { testid: 'users', rowId: (u) => u.id },
      ),
    ),
    h(
      'div',
      { class: 'grid-2' },
      card('Create a user', {}, create),
      card('Grant credits', { subtitle: 'Credits go to the user’s wallet.' }, grant),
    ),
  );
}

export const sections = [
  {
    id: 'report',
    label: 'Report',
    title: 'Platform report',
    render: report,
    needs: ['analytics_platform', 'analytics_timeseries'],
  },
  { id: 'reviews', label: 'Flagged keys', render: reviews },
  { id: 'fallback', label: 'Fallback pool', render: fallbackPool },
  { id: 'prices', label: 'Prices', render: prices },
  { id: 'disputes', label: 'Disputes', render: disputes, needs: ['admin_disputes_list', 'admin_disputes_resolve'] },
  { id: 'users', label: 'Users', render: users },
];
