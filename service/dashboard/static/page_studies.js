// The study list (#/studies): each study's arms, trials done, verdict and its sentence; refreshed every 2 s.

import { h, progressBar, replace, shortId, statusBadge, when } from "./dom.js";
import { outcomeBadge } from "./page_study.js";

const REFRESH_MS = 2000;
const PAGE_SIZE = 20;
const COLUMNS = ["Study", "Status", "Arms", "Seeds", "Trials ended", "Verdict", "Answer", "Submitted"];

export class StudiesPage {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.offset = Math.max(0, Number.parseInt(params.query.get("offset") || "0", 10) || 0);
    this.lastJson = "";
    this.timer = null;
    this.busy = false;
  }

  mount(root) {
    this.body = h("tbody", { id: "study-rows" });
    this.countText = h("span", { class: "muted", id: "study-count" });
    this.updated = h("span", { class: "muted small", id: "list-updated" });
    this.pager = h("div", { class: "pager" });
    replace(
      root,
      h(
        "div",
        { class: "page-head" },
        h("h1", {}, "Studies ", this.countText),
        h("div", { class: "controls" }, h("a", { class: "button primary", href: "#/studies/new", id: "new-study" }, "New study")),
      ),
      h(
        "p",
        { class: "help" },
        "A study runs one job in a few variants (arms, by default sync_bn on and off) with the same seeds, and says "
          + "whether the first arm pays: by how much, how surely, and at what cost in step time.",
      ),
      h(
        "div",
        { class: "table-wrap" },
        h("table", { class: "jobs" }, h("thead", {}, h("tr", {}, COLUMNS.map((t) => h("th", { scope: "col" }, t)))), this.body),
      ),
      h("div", { class: "list-foot" }, this.pager, this.updated),
    );
    this.refresh();
    this.timer = setInterval(() => {
      if (!document.hidden) this.refresh();
    }, REFRESH_MS);
  }

  async refresh() {
    if (this.busy) return;
    this.busy = true;
    try {
      const page = await this.ctx.api.get("v1/studies", { offset: this.offset, limit: PAGE_SIZE });
      const json = JSON.stringify(page);
      if (json !== this.lastJson) {
        this.lastJson = json;
        this.render(page);
      }
      this.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      if (error.status === 401) {
        this.lastJson = "";
        replace(this.body, h("tr", {}, h("td", { colspan: COLUMNS.length, class: "muted" }, "Waiting for an API token (see above).")));
      } else {
        this.updated.textContent = `could not refresh: ${error.message}`;
      }
    } finally {
      this.busy = false;
    }
  }

  render(page) {
    this.countText.textContent = `(${page.count})`;
    if (!page.data.length) {
      replace(
        this.body,
        h("tr", { class: "empty" }, h("td", { colspan: COLUMNS.length }, "No studies yet. ", h("a", { href: "#/studies/new" }, "Start one"))),
      );
    } else {
      replace(this.body, page.data.map((study) => this.row(study)));
    }
    const last = Math.min(page.count, this.offset + PAGE_SIZE);
    const buttons = [];
    if (this.offset > 0) buttons.push(h("a", { class: "button small", href: this.pageHash(this.offset - PAGE_SIZE) }, "← Newer"));
    if (this.offset + PAGE_SIZE < page.count) buttons.push(h("a", { class: "button small", href: this.pageHash(this.offset + PAGE_SIZE) }, "Older →"));
    replace(this.pager, page.count ? `${this.offset + 1}–${last} of ${page.count} ` : "", buttons);
  }

  pageHash(offset) {
    return offset > 0 ? `#/studies?offset=${offset}` : "#/studies";
  }

  row(study) {
    const ended = study.trials.filter((t) => ["succeeded", "failed", "cancelled"].includes(t.status)).length;
    const seeds = Array.isArray(study.spec.seeds) ? study.spec.seeds.length : study.spec.seeds;
    const href = `#/studies/${encodeURIComponent(study.id)}`;
    return h(
      "tr",
      { "data-study-id": study.id, "data-status": study.status },
      h(
        "td",
        { class: "job-cell" },
        h("a", { href, title: study.id }, study.name || shortId(study.id)),
        study.name ? h("div", { class: "muted small" }, shortId(study.id)) : null,
      ),
      h("td", {}, statusBadge(study.status)),
      h("td", {}, study.arms.map((arm) => arm.label).join(" vs ")),
      h("td", { class: "num" }, String(seeds)),
      h("td", { class: "progress-cell" }, progressBar(ended, study.trials.length, `${ended} / ${study.trials.length}`)),
      h("td", {}, outcomeBadge(study.verdict)),
      h("td", { class: "small study-answer" }, study.verdict?.sentence || "–"),
      h("td", { class: "small" }, when(study.created_at)),
    );
  }

  unmount() {
    clearInterval(this.timer);
  }
}
