// Building DOM nodes and formatting values for display.
//
// Every string reaches the page through textContent or an attribute set by setAttribute, never innerHTML:
// job names, error sentences and log lines come from users and workers, and must stay text.

/**
 * Create an element: h("a", {href: "#/jobs", class: "x"}, "text", childNode, [more, children]).
 * Attributes named on* take functions (event listeners); null/undefined/false attributes are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (name === "dataset") {
      for (const [key, v] of Object.entries(value)) node.dataset[key] = String(v);
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
  append(node, children);
  return node;
}

/** Append children (nodes, strings, numbers, nested arrays; null/undefined skipped) as nodes or text. */
export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace all children of `node`. */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

/** What a page shows when its first read failed: a wait for a token (401), or the error with a way back. */
export function showLoadError(root, error, { title, id, backHref, backText }) {
  if (error.status === 401) {
    replace(root, h("p", { class: "muted" }, "Waiting for an API token (see above)."));
    return;
  }
  replace(
    root,
    h("h2", {}, `${title} `, h("code", {}, id)),
    h("p", { class: "error-text" }, error.message),
    h("p", {}, h("a", { href: backHref }, backText)),
  );
}

const STATUS_LABELS = {
  queued: "queued",
  running: "running",
  succeeded: "succeeded",
  failed: "failed",
  cancelled: "cancelled",
};

/** The coloured badge of a job status. */
export function statusBadge(status) {
  const known = Object.hasOwn(STATUS_LABELS, status) ? status : "unknown";
  return h("span", { class: `badge status-${known}`, "data-status": status }, STATUS_LABELS[known] || String(status));
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

/** Whether a job status is final. */
export function isTerminal(status) {
  return TERMINAL.has(status);
}

/** A number with `digits` significant digits; "–" for null/undefined/NaN. */
export function num(value, digits = 4) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) return value.toExponential(digits - 1);
  return Number(value.toPrecision(digits)).toString();
}

/** An accuracy in [0, 1] as a percentage. */
export function pct(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return `${(value * 100).toFixed(1)}%`;
}

/** A UTC ISO timestamp as local date and time. */
export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

/** "12 s", "3 min 4 s", "1 h 2 min" for a number of seconds. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** Seconds between two ISO timestamps (the second defaults to now). */
export function elapsed(startIso, endIso) {
  if (!startIso) return null;
  const end = endIso ? new Date(endIso) : new Date();
  return (end.getTime() - new Date(startIso).getTime()) / 1000;
}

/** The first 8 hex digits of a job id (the full id stays in the title attribute). */
export function shortId(id) {
  return String(id).slice(0, 8);
}

/** A short label for a job: its name, or its short id. */
export function jobLabel(job) {
  return job.name ? `${job.name} (${shortId(job.id)})` : shortId(job.id);
}

/** A progress bar with a text label, e.g. "1 / 2 epochs". */
export function progressBar(done, total, label) {
  const share = total > 0 ? Math.min(1, Math.max(0, done / total)) : 0;
  const fill = h("div", { class: "progress-fill" });
  // CSSOM assignment, not a style attribute: the page's Content-Security-Policy forbids inline style attributes.
  fill.style.width = `${share * 100}%`;
  return h(
    "div",
    { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": done },
    fill,
    h("span", { class: "progress-label" }, label),
  );
}
