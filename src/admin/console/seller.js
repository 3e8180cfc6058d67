// Seller views: earnings, keys (health, pause and resume, deposit), notifications.

import {
  h,
  clip,
  card,
  stat,
  table,
  field,
  input,
  select,
  form,
  badge,
  num,
  credits,
  time,
  bps,
  shareBps,
  parseCount,
  parseList,
} from './dom.js';
import { barList } from './chart.js';
import { usageCard, exportButtons } from './usage.js';

const PROVIDERS = [
  ['openai', 'OpenAI'],
  ['deepseek', 'DeepSeek'],
  ['openrouter', 'OpenRouter'],
  ['moonshot', 'Moonshot'],
  ['siliconflow', 'SiliconFlow'],
];

/** Success rate from the key's success and failure counts: a bar and the share. */
export function health(k) {
  const total = k.success_count + k.failure_count;
  const rate = shareBps(k.success_count, total);
  const tone = rate === null ? 'muted' : rate >= 9500 ? 'ok' : rate >= 8000 ? 'warn' : 'bad';
  return h(
    'div',
    { class: 'health' },
    h('span', { class: ['health-rate', `text-${tone}`] }, rate === null ? 'no traffic' : bps(rate)),
    h('span', { class: 'health-counts' }, `${num(k.success_count)} ok · ${num(k.failure_count)} failed`),
  );
}

export function statusCell(k) {
  return h(
    'div',
    { class: 'stack' },
    badge(k.status),
    k.status_cause ? h('span', { class: 'muted small' }, `by ${k.status_cause}`) : null,
  );
}

async function overview(ctx, view, tools) {
  const [earnings, report] = await Promise.all([ctx.api.call('seller_earnings'), ctx.api.call('analytics_user')]);
  const mine = report?.seller ?? { earned_credits: 0, earned_last_7_days: 0, requests: 0, keys: [] };
  const chart = await usageCard(ctx, {
    scope: 'seller',
    metrics: ['earnings', 'requests', 'tokens'],
    title: 'Earnings over time',
    testid: 'seller-earnings-chart',
  });
  const active = mine.keys.filter((k) => k.status === 'active').length;
  const byKey = [...mine.keys].sort((a, b) => b.earned_credits - a.earned_credits);
  tools.append(exportButtons(ctx, 'seller'));
  view.append(
    h(
      'div',
      { class: 'stats', 'data-testid': 'earnings' },
      stat('Wallet balance', credits(earnings.balance), 'Earnings land here'),
      stat('Earned (all time)', credits(earnings.earned_total), 'Refunds deducted'),
      stat('Last 7 days', credits(mine.earned_last_7_days)),
      stat('Requests served', num(mine.requests), `${num(active)} of ${num(mine.keys.length)} keys active`),
    ),
    chart,
    card(
      'Earnings by key',
      {},
      barList(
        byKey.map((k) => ({ label: k.name || `key #${k.id}`, value: k.earned_credits })),
        { format: credits, testid: 'seller-earnings-by-key', empty: 'No keys yet.' },
      ),
    ),
  );
}

async function keys(ctx, view) {
  const [{ keys: list }, report] = await Promise.all([
    ctx.api.call('seller_keys_list'),
    ctx.api.has('analytics_user') ? ctx.api.call('analytics_user') : Promise.resolve(null),
  ]);
  const usage = new Map((report?.seller?.keys ?? []).map((k) => [k.id, k]));

  const toggle = (k) => {
    const pause = k.status === 'active';
    if (!pause && k.status !== 'paused') return null;
    const label = pause ? 'Pause' : 'Resume';
    return h(
      'button',
      {
        type: 'button',
        class: ['small', pause ? 'secondary' : 'primary'],
        'data-testid': `${pause ? 'pause' : 'resume'}-${k.id}`,
        onclick: (event) =>
          ctx.run(
            async () => {
              const params = { id: k.id };
              await (pause
                ? ctx.api.call('seller_keys_pause', { params })
                : ctx.api.call('seller_keys_resume', { params }));
              await ctx.refresh();
            },
            { button: event.currentTarget, success: `${k.name || `Key #${k.id}`} ${pause ? 'paused' : 'resumed'}.` },
          ),
      },
      label,
    );
  };

  view.append(
    card(
      'Your keys',
      { subtitle: 'Health is the share of successful requests; remaining balance weights routing.' },
      table(
        [
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
          { label: 'Review', cell: (k) => (k.review ? badge(k.review) : h('span', { class: 'muted' }, '—')) },
          { label: 'Health', cell: health },
          {
            label: 'Remaining',
            num: true,
            cell: (k) =>
              h(
                'div',
                { class: 'stack' },
                credits(k.remaining_balance),
                h('span', { class: 'muted small' }, `of ${num(k.declared_balance)}`),
              ),
          },
          { label: 'Requests', num: true, cell: (k) => num(usage.get(k.id)?.requests ?? 0) },
          { label: 'Earned', num: true, cell: (k) => credits(usage.get(k.id)?.earned_credits ?? 0) },
          { label: 'Last used (UTC)', nowrap: true, cell: (k) => time(k.last_used_at_ms) },
          { label: '', cell: toggle },
        ],
        list,
        { empty: 'No keys yet: deposit one below.', testid: 'seller-keys', rowId: (k) => k.id },
      ),
    ),
    card(
      'Deposit a key',
      {
        subtitle:
          'The key is verified against the provider before it joins the pool; it is stored encrypted and never shown again.',
      },
      depositForm(ctx),
    ),
  );
}

function depositForm(ctx) {
  const name = input('name', { maxlength: 100, placeholder: 'e.g. main' });
  const provider = select('provider', PROVIDERS);
  const baseUrl = input('base_url', { required: true, type: 'url', placeholder: 'https://api.openai.com/v1' });
  const models = input('models', { required: true, placeholder: 'gpt-4o-mini, gpt-4o' });
  const apiKey = input('api_key', {
    required: true,
    type: 'password',
    autocomplete: 'new-password',
    placeholder: 'sk-…',
  });
  const balance = input('declared_balance', { required: true, inputmode: 'numeric', placeholder: '1,000,000' });
  const concurrency = input('max_concurrency', { inputmode: 'numeric', placeholder: '0 = no cap' });
  const spend = input('max_spend_per_day', { inputmode: 'numeric', placeholder: '0 = no cap' });
  return form(
    { 'data-testid': 'deposit-key' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = {
            provider: provider.value,
            base_url: baseUrl.value.trim(),
            models: parseList(models.value),
            api_key: apiKey.value.trim(),
            declared_balance: parseCount(balance.value, 'declared balance'),
          };
          if (name.value.trim()) body.name = name.value.trim();
          if (concurrency.value.trim()) body.max_concurrency = parseCount(concurrency.value, 'max concurrency');
          if (spend.value.trim()) body.max_spend_per_day = parseCount(spend.value, 'max spend per day');
          const key = await ctx.api.call('seller_keys_create', { body });
          apiKey.value = '';
          await ctx.refresh();
          ctx.ok(`Key ${key.key_hint} verified and added to the pool.`);
        },
        { button },
      ),
    h('div', { class: 'row' }, field('Name', name), field('Provider', provider), field('Base URL', baseUrl)),
    h('div', { class: 'row' }, field('Models', models, 'Comma-separated'), field('API key', apiKey)),
    h(
      'div',
      { class: 'row' },
      field('Declared balance (credits)', balance),
      field('Max concurrency', concurrency),
      field('Max spend per day', spend),
    ),
    h('button', { type: 'submit', class: 'primary' }, 'Verify and deposit'),
  );
}

async function notifications(ctx, view) {
  const { notifications: list } = await ctx.api.call('notifications_list');
  const unread = list.filter((n) => !n.read_at_ms).length;
  view.append(
    card(
      'Latest notifications',
      { subtitle: unread ? `${num(unread)} unread` : 'All read' },
      table(
        [
          { label: '', cell: (n) => (n.read_at_ms ? null : h('span', { class: 'dot-unread', title: 'unread' })) },
          { label: 'When (UTC)', nowrap: true, cell: (n) => time(n.created_at_ms) },
          { label: 'Kind', cell: (n) => badge(n.kind, 'info') },
          { label: 'Message', cell: (n) => h('span', { class: n.read_at_ms ? 'muted' : null }, n.message) },
          { label: 'Key', cell: (n) => (n.hosted_key_id ? `#${n.hosted_key_id}` : '—') },
          {
            label: '',
            cell: (n) =>
              n.read_at_ms
                ? null
                : h(
                    'button',
                    {
                      type: 'button',
                      class: 'small secondary',
                      onclick: (event) =>
                        ctx.run(
                          async () => {
                            await ctx.api.call('notifications_read', { params: { id: n.id } });
                            await ctx.refresh();
                          },
                          { button: event.currentTarget },
                        ),
                    },
                    'Mark read',
                  ),
          },
        ],
        list,
        { empty: 'Nothing to report.', testid: 'notifications', rowId: (n) => n.id },
      ),
    ),
  );
}

export const sections = [
  {
    id: 'overview',
    label: 'Earnings',
    title: 'Earnings',
    render: overview,
    needs: ['seller_earnings', 'analytics_user', 'analytics_timeseries'],
  },
  { id: 'keys', label: 'Keys', render: keys },
  { id: 'notifications', label: 'Notifications', render: notifications },
];
