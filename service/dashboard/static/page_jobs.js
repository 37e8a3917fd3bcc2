// The job list (#/jobs): status, progress, best accuracy, cancel/delete, pick two to compare; refreshed every 2 s.

import { h, isTerminal, jobLabel, num, pct, progressBar, replace, shortId, statusBadge, when } from "./dom.js";

const REFRESH_MS = 2000;
const PAGE_SIZE = 25;
const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

export class JobsPage {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.status = STATUSES.includes(params.query.get("status") || "") ? params.query.get("status") || "" : "";
    this.offset = Math.max(0, Number.parseInt(params.query.get("offset") || "0", 10) || 0);
    this.selected = new Set();
    this.lastJson = "";
    this.timer = null;
    this.busy = false;
  }

  mount(root) {
    this.root = root;
    this.body = h("tbody", { id: "job-rows" });
    this.countText = h("span", { class: "muted", id: "job-count" });
    this.updated = h("span", { class: "muted small", id: "list-updated" });
    this.cluster = h("p", { class: "muted small", id: "cluster" });
    this.pager = h("div", { class: "pager" });
    this.compareButton = h(
      "button",
      { type: "button", id: "compare-selected", disabled: true, onclick: () => this.compare() },
      "Compare selected",
    );
    const filter = h(
      "select",
      {
        id: "status-filter",
        "aria-label": "Only jobs with this status",
        onchange: () => this.ctx.navigate(filter.value ? `#/jobs?status=${filter.value}` : "#/jobs"),
      },
      STATUSES.map((s) => h("option", { value: s, selected: s === this.status }, s || "all statuses")),
    );
    replace(
      root,
      h(
        "div",
        { class: "page-head" },
        h("h1", {}, "Jobs ", this.countText),
        h("div", { class: "controls" }, filter, this.compareButton, h("a", { class: "button primary", href: "#/new" }, "New job")),
      ),
      this.cluster,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "jobs" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["", "Job", "Status", "Model", "Workers", "sync_bn", "Progress", "Best val acc", "Verdict", "Submitted", ""].map(
                (title) => h("th", { scope: "col" }, title),
              ),
            ),
          ),
          this.body,
        ),
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
      const page = await this.ctx.api.get("v1/jobs", { status: this.status, offset: this.offset, limit: PAGE_SIZE });
      const json = JSON.stringify(page);
      if (json !== this.lastJson) {
        this.lastJson = json;
        this.render(page);
      }
      this.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
      this.refreshCluster();
    } catch (error) {
      if (error.status === 401) {
        this.lastJson = "";
        replace(this.body, h("tr", {}, h("td", { colspan: 11, class: "muted" }, "Waiting for an API token (see above).")));
      } else {
        this.updated.textContent = `could not refresh: ${error.message}`;
      }
    } finally {
      this.busy = false;
    }
  }

  async refreshCluster() {
    try {
      const c = await this.ctx.api.get("v1/cluster");
      this.cluster.textContent =
        `Cluster: ${num(c.cpus, 4)} CPUs (${num(c.available_cpus, 4)} free), ${num(c.gpus, 4)} GPUs · `
        + `${c.running_jobs} running, ${c.queued_jobs} queued · `
        + (c.max_concurrent_jobs > 0 ? `at most ${c.max_concurrent_jobs} at once` : "scheduling paused (max_concurrent_jobs=0)");
    } catch {
      this.cluster.textContent = "";
    }
  }

  render(page) {
    this.countText.textContent = `(${page.count})`;
    const ids = new Set(page.data.map((job) => job.id));
    for (const id of [...this.selected]) if (!ids.has(id)) this.selected.delete(id);
    if (!page.data.length) {
      replace(
        this.body,
        h(
          "tr",
          { class: "empty" },
          h("td", { colspan: 11 }, this.status ? `No ${this.status} jobs.` : "No jobs yet. ", h("a", { href: "#/new" }, "Submit one")),
        ),
      );
    } else {
      replace(this.body, page.data.map((job) => this.row(job)));
    }
    this.renderPager(page.count);
    this.updateCompareButton();
  }

  row(job) {
    const spec = job.spec;
    const s = job.summary;
    const check = h("input", {
      type: "checkbox",
      "aria-label": `select ${jobLabel(job)} for comparison`,
      checked: this.selected.has(job.id),
      onchange: () => {
        if (check.checked) this.selected.add(job.id);
        else this.selected.delete(job.id);
        this.updateCompareButton();
      },
    });
    const actions = [];
    if (!isTerminal(job.status)) {
      actions.push(
        h(
          "button",
          { type: "button", class: "danger small", "data-action": "cancel", disabled: job.cancel_requested, onclick: (e) => this.cancel(job, e.currentTarget) },
          job.cancel_requested ? "Stopping…" : "Cancel",
        ),
      );
    } else {
      actions.push(
        h("button", { type: "button", class: "small", "data-action": "delete", onclick: (e) => this.remove(job, e.currentTarget) }, "Delete"),
      );
    }
    return h(
      "tr",
      { "data-job-id": job.id, "data-status": job.status },
      h("td", {}, check),
      h(
        "td",
        { class: "job-cell" },
        h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, title: job.id }, job.name || shortId(job.id)),
        job.name ? h("div", { class: "muted small" }, shortId(job.id)) : null,
      ),
      h(
        "td",
        {},
        statusBadge(job.status),
        job.queue_position ? h("span", { class: "muted small" }, ` #${job.queue_position}`) : null,
      ),
      h("td", {}, `${spec.model} / ${spec.dataset.kind}`),
      h("td", { class: "num" }, `${spec.workers}${spec.use_gpu ? " GPU" : ""}`),
      h("td", {}, spec.sync_bn ? "on" : "off"),
      h("td", { class: "progress-cell" }, progressBar(s.epochs_done, spec.epochs, `${s.epochs_done} / ${spec.epochs}`)),
      h("td", { class: "num" }, pct(s.best_val_acc)),
      h("td", {}, s.verdict || "–"),
      h("td", { class: "small" }, when(job.created_at)),
      h("td", { class: "actions" }, actions),
    );
  }

  renderPager(count) {
    const buttons = [];
    if (this.offset > 0) {
      buttons.push(h("a", { class: "button small", href: this.pageHash(Math.max(0, this.offset - PAGE_SIZE)) }, "← Newer"));
    }
    if (this.offset + PAGE_SIZE < count) {
      buttons.push(h("a", { class: "button small", href: this.pageHash(this.offset + PAGE_SIZE) }, "Older →"));
    }
    const last = Math.min(count, this.offset + PAGE_SIZE);
    replace(this.pager, count ? `${this.offset + 1}–${last} of ${count} ` : "", buttons);
  }

  pageHash(offset) {
    const query = new URLSearchParams();
    if (this.status) query.set("status", this.status);
    if (offset) query.set("offset", String(offset));
    const text = query.toString();
    return text ? `#/jobs?${text}` : "#/jobs";
  }

  updateCompareButton() {
    this.compareButton.disabled = this.selected.size !== 2;
    this.compareButton.title = this.selected.size === 2 ? "" : "Tick exactly two jobs to compare them.";
  }

  compare() {
    const [a, b] = [...this.selected];
    this.ctx.navigate(`#/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  }

  async cancel(job, button) {
    button.disabled = true;
    try {
      const answer = await this.ctx.api.post(`v1/jobs/${encodeURIComponent(job.id)}/cancel`);
      this.ctx.flash(answer.status === "cancelled" ? `Job ${jobLabel(job)} cancelled.` : `Job ${jobLabel(job)} is stopping.`);
    } catch (error) {
      this.ctx.flash(`Could not cancel ${jobLabel(job)}: ${error.message}`, "error");
    }
    this.lastJson = "";
    this.refresh();
  }

  async remove(job, button) {
    if (!window.confirm(`Delete job ${jobLabel(job)} with its metrics, statistics, logs and files?`)) return;
    button.disabled = true;
    try {
      await this.ctx.api.del(`v1/jobs/${encodeURIComponent(job.id)}`);
      this.ctx.flash(`Job ${jobLabel(job)} deleted.`);
    } catch (error) {
      this.ctx.flash(`Could not delete ${jobLabel(job)}: ${error.message}`, "error");
    }
    this.lastJson = "";
    this.refresh();
  }

  unmount() {
    clearInterval(this.timer);
  }
}
