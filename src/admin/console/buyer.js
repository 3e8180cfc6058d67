// Buyer views: wallet and usage, API keys, escrows, disputes.

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
  num,
  credits,
  time,
  parseCount,
  parseList,
} from './dom.js';
import { barList } from './chart.js';
import { usageCard, exportButtons } from './usage.js';

async function overview(ctx, view, tools) {
  const [wallet, report] = await Promise.all([ctx.api.call('buyer_wallet'), ctx.api.call('analytics_user')]);
  const usage = report?.buyer ?? { spent_credits: 0, requests: 0, by_model: [], by_key: [] };
  const chart = await usageCard(ctx, {
    scope: 'buyer',
    metrics: ['requests', 'tokens', 'spend'],
    title: 'Usage over time',
    testid: 'buyer-usage-chart',
  });
  const byModel = [...usage.by_model].sort((a, b) => b.cost_credits - a.cost_credits);
  tools.append(exportButtons(ctx, 'buyer'));
  view.append(
    h(
      'div',
      { class: 'stats', 'data-testid': 'wallet' },
      stat('Wallet balance', credits(wallet.balance), wallet.wallet_pays ? 'Pays for requests' : 'Only escrows pay'),
      stat('Held in flight', credits(wallet.held), 'For requests under way'),
      stat('In active escrows', credits(wallet.escrowed)),
      stat('Spent (all time)', credits(usage.spent_credits), plural(usage.requests, 'request')),
    ),
    chart,
    h(
      'div',
      { class: 'grid-2' },
      card(
        'Spend by model',
        {},
        barList(
          byModel.map((m) => ({ label: m.model, value: m.cost_credits })),
          { format: credits, testid: 'buyer-spend-by-model', empty: 'No paid requests yet.' },
        ),
      ),
      card(
        'Usage by key',
        {},
        table(
          [
            { label: 'Key', cell: (k) => k.name ?? `#${k.buyer_key_id}` },
            { label: 'Requests', num: true, cell: (k) => num(k.requests) },
            { label: 'Tokens', num: true, cell: (k) => num(k.prompt_tokens + k.completion_tokens) },
            { label: 'Cost', num: true, cell: (k) => credits(k.cost_credits) },
          ],
          usage.by_key,
          { empty: 'No requests yet.' },
        ),
      ),
    ),
  );
}

async function keys(ctx, view) {
  const { keys: list } = await ctx.api.call('buyer_keys_list');
  const reveal = h('div', { class: 'reveal-slot' });
  const name = input('name', { required: true, maxlength: 100, placeholder: 'e.g. laptop' });
  const models = input('models', { placeholder: 'any model' });
  const created = form(
    { 'data-testid': 'create-key' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = { name: name.value.trim() };
          const allowed = parseList(models.value);
          if (allowed.length) body.models = allowed;
          const key = await ctx.api.call('buyer_keys_create', { body });
          await ctx.refresh();
          // The key is shown once, after the list is drawn again.
          const slot = document.querySelector('.reveal-slot');
          slot?.append(newKeyNotice(key));
        },
        { button },
      ),
    h(
      'div',
      { class: 'row' },
      field('Name', name),
      field('Models', models, 'Comma-separated; empty allows every model'),
    ),
    h('button', { type: 'submit', class: 'primary' }, 'Create key'),
  );
  view.append(
    reveal,
    card('Create an API key', { subtitle: 'Keys call the gateway with an OpenAI-compatible API.' }, created),
    card(
      'Your API keys',
      {},
      table(
        [
          { label: 'Name', cell: (k) => k.name },
          { label: 'Key', cell: (k) => h('code', {}, k.prefix) },
          { label: 'Models', cell: (k) => (k.models?.length ? k.models.join(', ') : 'any') },
          { label: 'Status', cell: (k) => badge(k.status) },
          { label: 'Created (UTC)', nowrap: true, cell: (k) => time(k.created_at_ms) },
          { label: 'Expires', nowrap: true, cell: (k) => time(k.expires_at_ms) },
          {
            label: '',
            cell: (k) =>
              k.status === 'active'
                ? confirmButton(
                    'Revoke',
                    (button) =>
                      ctx.run(
                        async () => {
                          await ctx.api.call('buyer_keys_revoke', { params: { id: k.id } });
                          await ctx.refresh();
                        },
                        { button, success: `Key ${k.name} revoked.` },
                      ),
                    { confirmLabel: 'Revoke for good?', testid: `revoke-${k.id}` },
                  )
                : null,
          },
        ],
        list,
        { empty: 'No keys yet: create one above.', testid: 'buyer-keys', rowId: (k) => k.id },
      ),
    ),
  );
}

function newKeyNotice(key) {
  const code = h('code', { class: 'secret', 'data-testid': 'new-key' }, key.key);
  const copy = h('button', { type: 'button', class: 'small' }, 'Copy');
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(key.key);
      copy.textContent = 'Copied';
    } catch {
      getSelection()?.selectAllChildren(code);
      copy.textContent = 'Selected: press Ctrl+C';
    }
  });
  return h(
    'div',
    { class: 'callout', role: 'status' },
    h('strong', {}, `New key “${key.name}”`),
    h('p', {}, 'Copy it now: it is shown only this once and cannot be recovered.'),
    h('div', { class: 'secret-row' }, code, copy),
  );
}

async function escrows(ctx, view) {
  const [{ escrows: list }, prices] = await Promise.all([
    ctx.api.call('buyer_escrows_list'),
    ctx.api.call('prices_list'),
  ]);
  const amount = input('amount', { required: true, inputmode: 'numeric', placeholder: '100,000' });
  const model = select('model', [['', 'Any model'], ...prices.map((p) => [p.model, p.model])]);
  const days = input('expires_in_days', { inputmode: 'numeric', placeholder: 'default' });
  const create = form(
    { 'data-testid': 'create-escrow' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = { amount: parseCount(amount.value, 'amount', { min: 1 }) };
          if (model.value) body.model = model.value;
          if (days.value.trim()) body.expires_in_days = parseCount(days.value, 'expires in days', { min: 1 });
          const escrow = await ctx.api.call('buyer_escrows_create', { body });
          await ctx.refresh();
          ctx.ok(`Escrow #${escrow.id} holds ${credits(escrow.amount)}.`);
        },
        { button },
      ),
    h(
      'div',
      { class: 'row' },
      field('Amount (credits)', amount),
      field('Model', model),
      field('Expires in (days)', days),
    ),
    h('button', { type: 'submit', class: 'primary' }, 'Create escrow'),
  );
  view.append(
    card(
      'Set credits aside',
      { subtitle: 'An escrow moves credits from your wallet; requests spend from it first.' },
      create,
    ),
    card(
      'Your escrows',
      {},
      table(
        [
          { label: '#', cell: (e) => `#${e.id}` },
          { label: 'Model', cell: (e) => e.model ?? 'any' },
          { label: 'Funded', num: true, cell: (e) => credits(e.amount) },
          { label: 'Left', num: true, cell: (e) => credits(e.balance) },
          { label: 'Held', num: true, cell: (e) => credits(e.held) },
          { label: 'Status', cell: (e) => badge(e.status) },
          { label: 'Expires (UTC)', nowrap: true, cell: (e) => time(e.expires_at_ms) },
          {
            label: '',
            cell: (e) =>
              e.status === 'active'
                ? confirmButton(
                    'Release',
                    (button) =>
                      ctx.run(
                        async () => {
                          await ctx.api.call('buyer_escrows_release', { params: { id: e.id } });
                          await ctx.refresh();
                        },
                        { button, success: `Escrow #${e.id} released.` },
                      ),
                    { confirmLabel: 'Return to wallet?', tone: 'secondary' },
                  )
                : null,
          },
        ],
        list,
        { empty: 'No escrows.', testid: 'escrows', rowId: (e) => e.id },
      ),
    ),
  );
}

function targetOf(d) {
  return d.target_kind === 'escrow'
    ? `Escrow #${d.escrow_id}`
    : h('span', {}, 'Request ', h('code', {}, d.request_id ?? '—'));
}

async function disputes(ctx, view) {
  const { disputes: list } = await ctx.api.call('buyer_disputes_list');
  const kind = select('kind', [
    ['request', 'A request'],
    ['escrow', 'An escrow'],
  ]);
  const target = input('target', { required: true, placeholder: 'request id or escrow number' });
  const reason = h('textarea', {
    name: 'reason',
    required: true,
    maxlength: 1000,
    rows: 3,
    placeholder: 'What went wrong?',
  });
  const open = form(
    { 'data-testid': 'open-dispute' },
    (_, button) =>
      ctx.run(
        async () => {
          const body = { reason: reason.value.trim() };
          if (kind.value === 'escrow') body.escrow_id = parseCount(target.value.replace('#', ''), 'escrow', { min: 1 });
          else body.request_id = target.value.trim();
          const dispute = await ctx.api.call('buyer_disputes_create', { body });
          await ctx.refresh();
          ctx.ok(`Dispute #${dispute.id} opened; an admin will review it.`);
        },
        { button },
      ),
    h('div', { class: 'row' }, field('Dispute', kind), field('Request id / escrow #', target)),
    field('Reason', reason),
    h('button', { type: 'submit', class: 'primary' }, 'Open dispute'),
  );
  view.append(
    card('Open a dispute', { subtitle: 'A refunded dispute returns the credits to your wallet.' }, open),
    card(
      'Your disputes',
      {},
      table(
        [
          { label: '#', cell: (d) => `#${d.id}` },
          { label: 'About', cell: targetOf },
          { label: 'Reason', cell: (d) => clip(d.reason) },
          { label: 'Status', cell: (d) => badge(d.status) },
          { label: 'Refunded', num: true, cell: (d) => credits(d.refunded_credits) },
          { label: 'Note', cell: (d) => d.resolution_note || '—' },
          { label: 'Opened (UTC)', nowrap: true, cell: (d) => time(d.created_at_ms) },
        ],
        list,
        { empty: 'No disputes.', testid: 'buyer-disputes', rowId: (d) => d.id },
      ),
    ),
  );
}

export const sections = [
  {
    id: 'overview',
    label: 'Overview',
    title: 'Wallet and usage',
    render: overview,
    needs: ['buyer_wallet', 'analytics_user', 'analytics_timeseries'],
  },
  { id: 'keys', label: 'API keys', render: keys },
  { id: 'escrows', label: 'Escrows', render: escrows },
  { id: 'disputes', label: 'Disputes', render: disputes, needs: ['buyer_disputes_list', 'buyer_disputes_create'] },
];
