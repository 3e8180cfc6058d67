// A usage chart card on analytics_timeseries: one metric at a time, hourly or daily buckets.

import { h, card, clear, segmented, num, credits } from './dom.js';
import { timeChart } from './chart.js';

export const METRICS = {
  requests: { label: 'Requests', kind: 'bar', format: num, series: [{ key: 'requests', label: 'Requests' }] },
  tokens: {
    label: 'Tokens',
    kind: 'line',
    format: num,
    series: [
      { key: 'prompt_tokens', label: 'Prompt tokens' },
      { key: 'completion_tokens', label: 'Completion tokens' },
    ],
  },
  spend: {
    label: 'Spend',
    kind: 'line',
    format: credits,
    series: [{ key: 'spend_credits', label: 'Spend (credits)' }],
  },
  earnings: {
    label: 'Earnings',
    kind: 'bar',
    format: credits,
    series: [{ key: 'earnings_credits', label: 'Earnings (credits)' }],
  },
  fees: {
    label: 'Platform fees',
    kind: 'bar',
    format: credits,
    series: [{ key: 'earnings_credits', label: 'Platform credits' }],
  },
};

/**
 * @param ctx the console context
 * @param {{scope: 'buyer'|'seller'|'platform', metrics: string[], granularity?: 'hour'|'day', title: string,
 *          subtitle?: string, testid: string}} options
 * @returns {Promise<HTMLElement>} the card, once its first chart is drawn
 */
export async function usageCard(ctx, { scope, metrics, granularity = 'hour', title, subtitle, testid }) {
  const state = { metric: metrics[0], granularity };
  const cache = new Map();
  const slot = h('div', { class: 'chart-slot' });

  async function series(g) {
    if (!cache.has(g)) {
      cache.set(g, await ctx.api.call('analytics_timeseries', { query: { scope, granularity: g } }));
    }
    return cache.get(g);
  }

  function draw(data) {
    const metric = METRICS[state.metric];
    clear(slot).append(
      timeChart({
        points: data.points ?? [],
        series: metric.series,
        kind: metric.kind,
        granularity: data.granularity ?? state.granularity,
        format: metric.format,
        testid,
        title: `${title}: ${metric.label}`,
      }),
    );
    slot.dataset.metric = state.metric;
    slot.dataset.granularity = state.granularity;
  }

  async function update() {
    slot.classList.add('stale');
    try {
      draw(await series(state.granularity));
    } catch (error) {
      ctx.error(error);
    } finally {
      slot.classList.remove('stale');
    }
  }

  const controls = [
    metrics.length > 1
      ? segmented(
          metrics.map((m) => [m, METRICS[m].label]),
          state.metric,
          (m) => {
            state.metric = m;
            update();
          },
          'Metric',
        )
      : null,
    segmented(
      [
        ['hour', 'Hourly'],
        ['day', 'Daily'],
      ],
      state.granularity,
      (g) => {
        state.granularity = g;
        update();
      },
      'Granularity',
    ),
  ];
  draw(await series(state.granularity));
  return card(
    title,
    { actions: controls, subtitle: subtitle ?? 'Hourly: the last 48 hours. Daily: the last 30 days. UTC.' },
    slot,
  );
}

/** Buttons that download the caller's usage records and ledger postings as CSV, in the given scope. */
export function exportButtons(ctx, scope) {
  const button = (label, testid, download) =>
    h(
      'button',
      {
        type: 'button',
        class: 'small secondary',
        'data-testid': testid,
        onclick: (event) =>
          ctx.run(async () => ctx.ok(`Downloaded ${await download()}.`), { button: event.currentTarget }),
      },
      label,
    );
  return h(
    'div',
    { class: 'toolbar' },
    h('span', { class: 'muted small' }, 'Export as CSV:'),
    ctx.api.has('export_usage_csv')
      ? button('Usage records', 'export-usage', () => ctx.api.download('export_usage_csv', { query: { scope } }))
      : null,
    ctx.api.has('export_transactions_csv')
      ? button('Transactions', 'export-transactions', () =>
          ctx.api.download('export_transactions_csv', { query: { scope } }),
        )
      : null,
  );
}
