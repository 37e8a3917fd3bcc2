// The dashboard's entry point: hash routes, the API token panel and flash messages.
//
// Routes: #/jobs (list), #/new (submit form), #/jobs/<id> (one job, live), #/compare?a=<id>&b=<id>,
// #/studies (list), #/studies/new (study form; ?from=<job id> starts from a job), #/studies/<id> (one study, live).
// Each page is a class with mount(root) and unmount(); the router unmounts the old page (closing its event
// streams and timers) before mounting the next one.

import { Api } from "./api.js";
import { h, replace } from "./dom.js";
import { ComparePage } from "./page_compare.js";
import { JobPage } from "./page_job.js";
import { JobsPage } from "./page_jobs.js";
import { NewJobPage } from "./page_new.js";
import { NewStudyPage } from "./page_new_study.js";
import { StudiesPage } from "./page_studies.js";
import { StudyPage } from "./page_study.js";

const FLASH_MS = 8000;

/** The page class and its parameters for a location hash. */
function route(hash) {
  const [path, queryText = ""] = hash.replace(/^#/, "").split("?");
  const query = new URLSearchParams(queryText);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts.length === 0 || (parts[0] === "jobs" && parts.length === 1)) return { Page: JobsPage, params: { query }, nav: "jobs" };
  if (parts[0] === "jobs" && parts.length === 2) return { Page: JobPage, params: { query, id: parts[1] }, nav: "jobs" };
  if (parts[0] === "new") return { Page: NewJobPage, params: { query }, nav: "new" };
  if (parts[0] === "compare") return { Page: ComparePage, params: { query }, nav: "compare" };
  if (parts[0] === "studies" && parts.length === 1) return { Page: StudiesPage, params: { query }, nav: "studies" };
  if (parts[0] === "studies" && parts[1] === "new" && parts.length === 2) return { Page: NewStudyPage, params: { query }, nav: "studies" };
  if (parts[0] === "studies" && parts.length === 2) return { Page: StudyPage, params: { query, id: parts[1] }, nav: "studies" };
  return null;
}

class App {
  constructor() {
    this.root = document.getElementById("page");
    this.flashBox = document.getElementById("flash");
    this.authPanel = document.getElementById("auth-panel");
    this.authReason = document.getElementById("auth-reason");
    this.authInput = document.getElementById("auth-token");
    this.tokenState = document.getElementById("token-state");
    this.page = null;
    this.api = new Api((detail) => this.askForToken(detail));
    this.ctx = {
      api: this.api,
      flash: (message, kind) => this.flash(message, kind),
      navigate: (hash) => this.navigate(hash),
    };
    document.getElementById("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = this.authInput.value.trim();
      if (!token) return;
      this.api.setToken(token);
      this.authInput.value = "";
      this.authPanel.hidden = true;
      this.renderTokenState();
      this.show();
    });
    window.addEventListener("hashchange", () => this.show());
    this.renderTokenState();
    this.show();
  }

  navigate(hash) {
    if (location.hash === hash) this.show();
    else location.hash = hash;
  }

  /** Unmount the current page and mount the one the location hash names. */
  show() {
    this.page?.unmount();
    this.page = null;
    const match = route(location.hash || "#/jobs");
    for (const link of document.querySelectorAll("[data-nav]")) {
      if (match && link.dataset.nav === match.nav) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (!match) {
      replace(this.root, h("h1", {}, "Not found"), h("p", {}, "No page here. ", h("a", { href: "#/jobs" }, "Go to the job list.")));
      return;
    }
    this.page = new match.Page(this.ctx, match.params);
    Promise.resolve(this.page.mount(this.root)).catch((error) => {
      console.error("page failed", error);
      replace(this.root, h("p", { class: "error-text" }, `This page failed: ${error.message}`));
    });
  }

  /** The service answered 401: show the token panel with its sentence (a wrong token or none at all). */
  askForToken(detail) {
    if (this.api.token) {
      // The stored token was refused: forget it, so the next attempt is a fresh paste.
      this.api.clearToken();
      this.renderTokenState();
    }
    this.authReason.textContent = detail || "The service answered 401 Unauthorized.";
    if (this.authPanel.hidden) {
      this.authPanel.hidden = false;
      this.authInput.focus();
    }
  }

  renderTokenState() {
    this.showWhoami();
    if (this.api.token) {
      replace(
        this.tokenState,
        h("span", { class: "muted small", id: "token-set" }, "API token set"),
        h(
          "button",
          {
            type: "button",
            class: "small",
            id: "forget-token",
            onclick: () => {
              this.api.clearToken();
              this.renderTokenState();
              this.show();
            },
          },
          "Forget token",
        ),
      );
    } else {
      replace(
        this.tokenState,
        h(
          "button",
          {
            type: "button",
            class: "small",
            id: "set-token",
            onclick: () => {
              this.authReason.textContent = "Paste a token if this service requires one.";
              this.authPanel.hidden = false;
              this.authInput.focus();
            },
          },
          "Set API token",
        ),
      );
    }
  }

  /** Show in the header which principal the service takes us for (GET v1/whoami), or nothing when unknown. */
  async showWhoami() {
    const box = document.getElementById("whoami");
    const asked = this.api.token;
    let text = "";
    try {
      // A plain fetch: a 401 here is not news (the page's own requests already ask for a token).
      const response = await fetch(this.api.url("v1/whoami"), { headers: this.api.headers({ Accept: "application/json" }) });
      if (response.ok) {
        const me = await response.json();
        text = me.authenticated ? `signed in as ${me.principal}${me.admin ? " (admin: all jobs)" : ""}` : "open service: no token needed";
      }
    } catch (error) {
      console.warn("whoami failed", error);
    }
    if (this.api.token === asked) box.textContent = text; // a token changed meanwhile: its own call answers
  }

  flash(message, kind = "info") {
    const item = h(
      "div",
      { class: `flash-item flash-${kind}` },
      h("span", {}, message),
      h("button", { type: "button", class: "link", "aria-label": "dismiss", onclick: () => item.remove() }, "×"),
    );
    this.flashBox.append(item);
    setTimeout(() => item.remove(), kind === "error" ? FLASH_MS * 2 : FLASH_MS);
  }
}

new App();
