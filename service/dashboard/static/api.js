// The REST API client of the dashboard: JSON requests with the bearer token, and the job event stream.
//
// The token lives in sessionStorage (this tab only, gone when it closes) and travels as
// `Authorization: Bearer <token>`. EventSource cannot send that header, so the event stream is read with
// fetch() and parsed here (the text/event-stream format: `event:`, `data:`, `id:`, `retry:` lines, blank line
// ends an event); on a dropped connection it reconnects with `Last-Event-ID`, so no event is missed.

const TOKEN_KEY = "syncbn.token";

/** A non-2xx answer of the API: `status`, the sentence in `detail` and, for 422, the per-field `errors`. */
export class ApiError extends Error {
  constructor(status, detail, errors = null) {
    super(detail || `the service answered HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail || this.message;
    this.errors = Array.isArray(errors) ? errors : [];
  }
}

/** Read an error body: `{"detail": "...", "errors": [...]}` from this API, or whatever text came back. */
async function errorFrom(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body === "object") {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
      return new ApiError(response.status, detail, body.errors);
    }
  } catch {
    // not JSON: a proxy's HTML error page, for instance
  }
  return new ApiError(response.status, text.trim().slice(0, 300) || `HTTP ${response.status} ${response.statusText}`);
}

/** The client: `get`, `post`, `del`, `download`, and `follow` for event streams. */
export class Api {
  /** `onUnauthorized(detail)` runs whenever the service answers 401 (the page then asks for a token). */
  constructor(onUnauthorized = () => {}) {
    this.onUnauthorized = onUnauthorized;
  }

  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  setToken(token) {
    sessionStorage.setItem(TOKEN_KEY, token.trim());
  }

  clearToken() {
    sessionStorage.removeItem(TOKEN_KEY);
  }

  /** Request headers with the bearer token when one is set. */
  headers(extra = {}) {
    const headers = { ...extra };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  /** An absolute URL for an API path such as "v1/jobs" (relative to the page, so a proxy prefix works). */
  url(path, query = {}) {
    const url = new URL(path, document.baseURI);
    for (const [key, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, String(value));
    }
    return url;
  }

  /** Send a request; resolve to the parsed JSON (null for 204), or reject with an ApiError. */
  async request(method, path, { query = {}, body, headers = {}, signal } = {}) {
    const init = { method, headers: this.headers({ Accept: "application/json", ...headers }), signal };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(this.url(path, query), init);
    if (!response.ok) {
      const error = await errorFrom(response);
      if (response.status === 401) this.onUnauthorized(error.detail);
      throw error;
    }
    if (response.status === 204) return null;
    return response.json(); // 202 (a cancel still stopping) carries the job, like 200
  }

  get(path, query, options = {}) {
    return this.request("GET", path, { ...options, query });
  }

  /** GET a binary form of an answer (the `accept` media type); resolve to its ArrayBuffer. */
  async getBinary(path, query, accept) {
    const response = await fetch(this.url(path, query), { headers: this.headers({ Accept: accept }) });
    if (!response.ok) {
      const error = await errorFrom(response);
      if (response.status === 401) this.onUnauthorized(error.detail);
      throw error;
    }
    return response.arrayBuffer();
  }

  post(path, body, options = {}) {
    return this.request("POST", path, { ...options, body });
  }

  del(path, options = {}) {
    return this.request("DELETE", path, options);
  }

  /** Download a file the API serves (with the token), saving it under `filename`. */
  async download(path, filename) {
    const response = await fetch(this.url(path), { headers: this.headers() });
    if (!response.ok) {
      const error = await errorFrom(response);
      if (response.status === 401) this.onUnauthorized(error.detail);
      throw error;
    }
    const blobUrl = URL.createObjectURL(await response.blob());
    const link = Object.assign(document.createElement("a"), { href: blobUrl, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(blobUrl), 10_000);
  }

  /**
   * Follow a Server-Sent Events stream. Returns an EventStream; call .stop() to close it.
   * `onEvent({id, type, data})` gets each event (data parsed as JSON when it is JSON);
   * `onState(state, detail)` hears "connecting", "live", "reconnecting", "ended", "unauthorized" and "error";
   * `reconnect()` says whether to reconnect after the server closed the stream normally.
   */
  follow(path, handlers) {
    const stream = new EventStream(this, path, handlers);
    stream.start();
    return stream;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** One followed event stream (see Api.follow). */
export class EventStream {
  constructor(api, path, { onEvent, onState = () => {}, reconnect = () => true }) {
    this.api = api;
    this.path = path;
    this.onEvent = onEvent;
    this.onState = onState;
    this.reconnect = reconnect;
    this.controller = new AbortController();
    this.lastEventId = "";
    this.retryMs = 2000;
    this.resetEvent();
  }

  start() {
    this.run();
  }

  stop() {
    this.controller.abort();
  }

  get stopped() {
    return this.controller.signal.aborted;
  }

  resetEvent() {
    this.event = { type: "", data: [], id: null };
  }

  async run() {
    const signal = this.controller.signal;
    while (!this.stopped) {
      try {
        this.onState("connecting");
        const headers = this.api.headers({ Accept: "text/event-stream" });
        if (this.lastEventId) headers["Last-Event-ID"] = this.lastEventId;
        const response = await fetch(this.api.url(this.path), { headers, signal, cache: "no-store" });
        if (!response.ok) {
          const error = await errorFrom(response);
          if (response.status === 401) {
            this.api.onUnauthorized(error.detail);
            this.onState("unauthorized", error.detail);
            return;
          }
          this.onState("error", error.detail);
          if (response.status >= 400 && response.status < 500) return; // 404: deleted; retrying will not help
        } else {
          this.onState("live");
          await this.read(response.body);
          if (this.stopped) return;
          if (!this.reconnect()) {
            this.onState("ended");
            return;
          }
          this.onState("reconnecting", "the server closed the stream");
        }
      } catch (error) {
        if (this.stopped) return;
        this.onState("reconnecting", error.message);
      }
      await sleep(this.retryMs, signal);
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    this.resetEvent();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const lines = buffer.split(/\r\n|\n|\r(?!$)/);
        buffer = lines.pop();
        for (const line of lines) this.line(line);
      }
    } finally {
      reader.releaseLock();
    }
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment (the server's greeting or a keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event.type = value;
    else if (field === "data") this.event.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.event.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
  }

  dispatch() {
    const { type, data, id } = this.event;
    this.resetEvent();
    if (id !== null) this.lastEventId = id;
    if (data.length === 0) return;
    const text = data.join("\n");
    let parsed = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // keep the text
    }
    this.onEvent({ id: id ?? this.lastEventId, type: type || "message", data: parsed });
  }
}
