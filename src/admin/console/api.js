// The console's only way to the server: operations are called by their OpenAPI operationId, resolved
// through the document the server publishes, so the console never hard-codes an API path.

const SPEC_URL = '/api/v1/openapi.json';
const TOKEN_KEY = 'tokex.session';
const METHODS = ['get', 'put', 'post', 'delete', 'patch'];

/** An answer in the API's error shape `{"error":{"code","message"}}`, or a transport failure. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

export class Api {
  /** @param {Map<string, {method: string, path: string}>} operations */
  constructor(operations, title) {
    this.operations = operations;
    this.title = title;
    /** Called with the error when the session is no longer valid (401). */
    this.onUnauthorized = () => {};
  }

  static async load() {
    let response;
    try {
      response = await fetch(SPEC_URL, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, 'unreachable', `The server cannot be reached (${e.message}).`);
    }
    if (!response.ok) {
      throw new ApiError(
        response.status,
        'no_api_document',
        `The API document could not be loaded (HTTP ${response.status}).`,
      );
    }
    const spec = await response.json();
    const operations = new Map();
    for (const [path, item] of Object.entries(spec.paths ?? {})) {
      for (const method of METHODS) {
        const id = item?.[method]?.operationId;
        if (id) operations.set(id, { method: method.toUpperCase(), path });
      }
    }
    return new Api(operations, spec.info?.title ?? 'API');
  }

  has(operationId) {
    return this.operations.has(operationId);
  }

  /** Those of the operations that this server does not offer. */
  missing(operationIds) {
    return operationIds.filter((id) => !this.operations.has(id));
  }

  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  /** The URL of an operation: path parameters substituted (percent-encoded), query parameters appended. */
  url(operationId, params = {}, query = {}) {
    const op = this.operations.get(operationId);
    if (!op) {
      throw new ApiError(0, 'unknown_operation', `This server does not offer the operation ${operationId}.`);
    }
    const path = op.path.replace(/\{([^}]+)\}/g, (_, name) => {
      const value = params[name];
      if (value === undefined || value === null || value === '') {
        throw new ApiError(0, 'missing_parameter', `${operationId} needs the path parameter ${name}.`);
      }
      return encodeURIComponent(String(value));
    });
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(query)) {
      if (value !== undefined && value !== null && value !== '') search.append(name, String(value));
    }
    const qs = search.toString();
    return qs ? `${path}?${qs}` : path;
  }

  /** Sends the request of an operation; resolves to the response when it succeeded, else rejects. */
  async send(operationId, { params = {}, query = {}, body, headers = {} } = {}) {
    const op = this.operations.get(operationId);
    const url = this.url(operationId, params, query);
    const init = { method: op.method, headers: { Accept: 'application/json', ...headers }, cache: 'no-store' };
    const token = this.token;
    if (token) init.headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (e) {
      throw new ApiError(0, 'unreachable', `The server cannot be reached (${e.message}).`);
    }
    if (response.ok) return response;
    let error = null;
    try {
      error = (await response.json())?.error;
    } catch {
      error = null;
    }
    const failure = error?.code
      ? new ApiError(response.status, error.code, error.message ?? error.code)
      : new ApiError(response.status, `http_${response.status}`, `The server answered HTTP ${response.status}.`);
    if (response.status === 401) this.onUnauthorized(failure);
    throw failure;
  }

  /**
   * Calls an operation. Resolves to the parsed JSON body (null for 204), rejects with an ApiError.
   * @param {string} operationId
   * @param {{params?: object, query?: object, body?: unknown, headers?: object}} [options]
   */
  async call(operationId, options) {
    const response = await this.send(operationId, options);
    if (response.status === 204) return null;
    const text = await response.text();
    if (!text) return null;
    if (!(response.headers.get('Content-Type') ?? '').includes('json')) return text;
    return JSON.parse(text);
  }

  /** Calls an operation that answers a file (a CSV export) and hands it to the browser as a download. */
  async download(operationId, options) {
    const response = await this.send(operationId, { ...options, headers: { Accept: 'text/csv' } });
    const disposition = response.headers.get('Content-Disposition') ?? '';
    const name = /filename="?([^";]+)"?/.exec(disposition)?.[1] ?? `${operationId}.csv`;
    const link = document.createElement('a');
    link.href = URL.createObjectURL(await response.blob());
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
    return name;
  }
}
