// The console's shell: sign-in, one tab per role the user has, a section menu per role, and the message
// area where every API error is shown. Routes are `#/<role>/<section>`.

import { Api, ApiError } from './api.js';
import { h, clear, badge } from './dom.js';
import * as buyer from './buyer.js';
import * as seller from './seller.js';
import * as admin from './admin.js';

const ROLES = [
  { id: 'buyer', label: 'Buyer', sections: buyer.sections },
  { id: 'seller', label: 'Seller', sections: seller.sections },
  { id: 'admin', label: 'Admin', sections: admin.sections },
];

const root = document.getElementById('app');
const messages = document.getElementById('messages');

let api;
let user = null;
let renderId = 0;

// --- messages -------------------------------------------------------------------------------------------

function describe(error) {
  if (error instanceof ApiError) return { text: error.message, code: error.code };
  return { text: error?.message ?? String(error), code: null };
}

function showMessage(kind, text, code) {
  const item = h(
    'div',
    { class: ['message', `message-${kind}`], role: kind === 'error' ? 'alert' : 'status' },
    h('span', { class: 'message-text' }, text),
    code ? h('code', { class: 'message-code' }, code) : null,
    h('button', { type: 'button', class: 'message-close', 'aria-label': 'Dismiss', onclick: () => item.remove() }, '×'),
  );
  messages.append(item);
  if (kind !== 'error') setTimeout(() => item.remove(), 6000);
}

function showError(error) {
  const { text, code } = describe(error);
  showMessage('error', text, code);
}

function clearMessages() {
  clear(messages);
}

// --- the context every view gets ------------------------------------------------------------------------

const ctx = {
  get api() {
    return api;
  },
  get user() {
    return user;
  },
  error: showError,
  ok: (text) => showMessage('ok', text),
  /**
   * Runs an action started by the user: earlier messages go, the button is disabled meanwhile, a failure is
   * shown in the message area. Resolves to true when the action succeeded.
   */
  async run(action, { button, success } = {}) {
    clearMessages();
    if (button) button.disabled = true;
    try {
      await action();
      if (success) showMessage('ok', success);
      return true;
    } catch (error) {
      showError(error);
      return false;
    } finally {
      if (button) button.disabled = false;
    }
  },
  /** Renders the current section again (after a change). */
  refresh: () => render(),
};

// --- sign-in ---------------------------------------------------------------------------------------------

function loginView() {
  const username = h('input', { name: 'username', autocomplete: 'username', required: true, autofocus: true });
  const password = h('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const submit = h('button', { type: 'submit', class: 'primary wide' }, 'Sign in');
  const form = h(
    'form',
    { class: 'login-card', 'data-testid': 'login' },
    h('div', { class: 'brand brand-large' }, h('span', { class: 'logo' }, 'tx'), h('span', {}, 'token-exchange')),
    h('p', { class: 'sub' }, 'Sign in to manage keys, funds and the marketplace.'),
    h('label', { class: 'field' }, h('span', { class: 'field-label' }, 'Username'), username),
    h('label', { class: 'field' }, h('span', { class: 'field-label' }, 'Password'), password),
    submit,
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    await ctx.run(
      async () => {
        const session = await api.call('auth_login', {
          body: { username: username.value.trim(), password: password.value },
        });
        api.token = session.token;
        user = session.user;
        password.value = '';
        history.replaceState(null, '', defaultRoute());
        render();
      },
      { button: submit },
    );
  });
  clear(root).append(h('div', { class: 'login' }, form));
}

async function logout() {
  try {
    if (api.token) await api.call('auth_logout');
  } catch {
    // The session is dropped here whatever the server says.
  }
  api.token = null;
  user = null;
  clearMessages();
  history.replaceState(null, '', location.pathname);
  loginView();
}

// --- routing and layout ---------------------------------------------------------------------------------

function rolesOf(u) {
  return ROLES.filter((role) => u?.roles?.includes(role.id));
}

function defaultRoute() {
  const role = rolesOf(user)[0];
  return role ? `#/${role.id}/${role.sections[0].id}` : '#/';
}

function currentRoute() {
  const [, roleId, sectionId] = location.hash.split('/');
  const roles = rolesOf(user);
  const role = roles.find((r) => r.id === roleId) ?? roles[0];
  if (!role) return { role: null, section: null };
  const section = role.sections.find((sec) => sec.id === sectionId) ?? role.sections[0];
  return { role, section };
}

function shell(role, section) {
  const tabs = h(
    'nav',
    { class: 'tabs', 'aria-label': 'Roles' },
    rolesOf(user).map((r) =>
      h(
        'a',
        { href: `#/${r.id}/${r.sections[0].id}`, class: r === role ? 'active' : null, 'data-role': r.id },
        r.label,
      ),
    ),
  );
  const header = h(
    'header',
    { class: 'topbar' },
    h('div', { class: 'brand' }, h('span', { class: 'logo' }, 'tx'), h('span', {}, 'token-exchange')),
    tabs,
    h(
      'div',
      { class: 'who' },
      h('span', { class: 'who-name', 'data-testid': 'username' }, user.username),
      (user.roles ?? []).map((r) => badge(r)),
      h('button', { type: 'button', class: 'ghost', 'data-testid': 'logout', onclick: logout }, 'Sign out'),
    ),
  );
  const menu = h(
    'nav',
    { class: 'sections', 'aria-label': `${role.label} sections` },
    role.sections.map((sec) =>
      h(
        'a',
        { href: `#/${role.id}/${sec.id}`, class: sec === section ? 'active' : null, 'data-section': sec.id },
        sec.label,
      ),
    ),
  );
  const content = h('main', {
    class: 'content',
    id: 'content',
    'data-view': `${role.id}/${section.id}`,
    'aria-busy': 'true',
  });
  clear(root).append(header, h('div', { class: 'layout' }, menu, content));
  return content;
}

async function render() {
  if (!user) return loginView();
  const { role, section } = currentRoute();
  if (!role) {
    clear(root).append(
      h(
        'div',
        { class: 'login' },
        h(
          'div',
          { class: 'login-card' },
          h('h2', {}, 'No console for this account'),
          h('p', {}, 'This account has no buyer, seller or admin role.'),
          h('button', { type: 'button', onclick: logout }, 'Sign out'),
        ),
      ),
    );
    return;
  }
  const expected = `#/${role.id}/${section.id}`;
  if (location.hash !== expected) history.replaceState(null, '', expected);
  const id = ++renderId;
  const content = shell(role, section);
  // Views may put buttons beside the title (exports).
  const tools = h('div', { class: 'page-tools' });
  content.append(
    h('div', { class: 'page-head' }, h('h1', { class: 'page-title' }, section.title ?? section.label), tools),
  );
  const missing = api.missing(section.needs ?? []);
  if (missing.length) {
    content.append(h('p', { class: 'notice' }, `This server does not offer ${missing.join(', ')} yet.`));
    content.setAttribute('aria-busy', 'false');
    return;
  }
  const body = h('div', { class: 'section-body' }, h('p', { class: 'loading' }, 'Loading…'));
  content.append(body);
  try {
    const view = h('div', { class: 'view' });
    await section.render(ctx, view, tools);
    if (id !== renderId) return;
    body.replaceWith(view);
  } catch (error) {
    if (id !== renderId) return;
    clear(body).append(h('p', { class: 'notice notice-error' }, 'This view could not be loaded.'));
    showError(error);
  } finally {
    if (id === renderId) content.setAttribute('aria-busy', 'false');
  }
}

// --- start -----------------------------------------------------------------------------------------------

async function start() {
  try {
    api = await Api.load();
  } catch (error) {
    clear(root).append(
      h('div', { class: 'login' }, h('div', { class: 'login-card' }, h('h2', {}, 'The console cannot start'))),
    );
    showError(error);
    return;
  }
  api.onUnauthorized = () => {
    if (!user) return;
    api.token = null;
    user = null;
    // Whoever made the call shows the error itself.
    loginView();
  };
  window.addEventListener('hashchange', () => {
    clearMessages();
    render();
  });
  if (api.token) {
    try {
      user = await api.call('auth_me');
    } catch (error) {
      api.token = null;
      user = null;
      if (!(error instanceof ApiError && error.status === 401)) showError(error);
    }
  }
  render();
}

start();
