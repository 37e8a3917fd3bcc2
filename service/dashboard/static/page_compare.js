// Two jobs side by side (#/compare?a=<id>&b=<id>): how their specs differ, their results, their curves
// overlaid (e.g. sync_bn on vs off with the same seed) and their BatchNorm statistics next to each other.

import { PALETTE } from "./charts.js";
import { CurveOverlay } from "./curve_overlay.js";
import { h, jobLabel, num, pct, replace, shortId, statusBadge } from "./dom.js";
import { JobFeed } from "./job_feed.js";
import { LayerHeatmap, STATISTICS, statisticHelp, statisticSelect } from "./layer_view.js";

const COLORS = [PALETTE.blue, PALETTE.orange];

/** Flatten a spec to {"optimizer.lr": 0.1, ...} for a field-by-field comparison. */
function flatten(value, prefix = "", out = {}) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out[prefix] = value;
  }
  return out;
}

function show(value) {
  return value === null || value === undefined ? "null" : Array.isArray(value) ? `[${value.join(", ")}]` : String(value);
}

function mean(values) {
  const finite = values.filter((v) => Number.isFinite(v));
  return finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : null;
}

export class ComparePage {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.ids = [params.query.get("a") || "", params.query.get("b") || ""];
    this.feeds = [];
    this.curves = null;
    this.heatmaps = [];
    this.statistic = STATISTICS[0].key;
  }

  async mount(root) {
    this.root = root;
    this.pickers = h("div", { class: "controls" });
    this.content = h("div", { id: "compare-content" });
    replace(
      root,
      h("div", { class: "page-head" }, h("h1", {}, "Compare two jobs"), this.pickers),
      h("p", { class: "help" }, "Pick two jobs, e.g. the same spec and seed with sync_bn on and off."),
      this.content,
    );
    await this.renderPickers();
    if (!this.ids[0] || !this.ids[1]) {
      replace(this.content, h("p", { class: "muted" }, "Choose job A and job B above."));
      return;
    }
    this.feeds = this.ids.map((id) => new JobFeed(this.ctx.api, id));
    try {
      await Promise.all(this.feeds.map((feed) => feed.start(this.statistic)));
    } catch (error) {
      replace(this.content, h("p", { class: "error-text" }, error.status === 401 ? "Waiting for an API token." : error.message));
      return;
    }
    this.render();
    this.unsubscribers = this.feeds.map((feed) => feed.subscribe((changed) => this.onChange(changed)));
  }

  async renderPickers() {
    let jobs = [];
    try {
      jobs = (await this.ctx.api.get("v1/jobs", { limit: 200 })).data;
    } catch (error) {
      replace(this.pickers, h("span", { class: "error-text" }, error.message));
      return;
    }
    const selects = ["a", "b"].map((name, i) => {
      const select = h(
        "select",
        { id: `compare-${name}`, "aria-label": `job ${name.toUpperCase()}`, onchange: () => this.pick() },
        h("option", { value: "" }, `job ${name.toUpperCase()}…`),
        jobs.map((job) =>
          h("option", { value: job.id, selected: job.id === this.ids[i] }, `${jobLabel(job)} · ${job.status} · sync_bn ${job.spec.sync_bn ? "on" : "off"}`),
        ),
      );
      return select;
    });
    this.selects = selects;
    replace(
      this.pickers,
      h("label", { class: "inline swatch-a" }, "A "),
      selects[0],
      h("label", { class: "inline swatch-b" }, "B "),
      selects[1],
      h("button", { type: "button", onclick: () => this.swap() }, "Swap"),
    );
  }

  pick() {
    const [a, b] = this.selects.map((s) => s.value);
    const query = new URLSearchParams();
    if (a) query.set("a", a);
    if (b) query.set("b", b);
    this.ctx.navigate(`#/compare?${query}`);
  }

  swap() {
    const [a, b] = this.selects.map((s) => s.value);
    this.selects[0].value = b;
    this.selects[1].value = a;
    this.pick();
  }

  name(i) {
    const job = this.feeds[i].job;
    return `${i === 0 ? "A" : "B"}: ${job.name || shortId(job.id)}`;
  }

  render() {
    this.summaryBox = h("div", { class: "compare-summary", id: "compare-summary" });
    const diffBox = h("div", { id: "spec-diff" });
    const curvesBox = h("div", { class: "chart-grid" });
    const heatmapBoxes = [h("div", { id: "compare-heatmap-a" }), h("div", { id: "compare-heatmap-b" })];
    const help = h("p", { class: "help" }, statisticHelp(this.statistic));
    replace(
      this.content,
      this.summaryBox,
      h("section", { class: "panel" }, h("h2", {}, "Spec differences"), diffBox),
      h("section", { class: "panel" }, h("h2", {}, "Curves"), curvesBox),
      h(
        "section",
        { class: "panel" },
        h(
          "div",
          { class: "panel-head" },
          h("h2", {}, "BatchNorm layers"),
          h(
            "div",
            { class: "controls" },
            statisticSelect(this.statistic, (key) => {
              this.statistic = key;
              help.textContent = statisticHelp(key);
              for (const heatmap of this.heatmaps) heatmap.setStatistic(key);
              this.shareColourScale();
            }, "compare-stat"),
          ),
        ),
        help,
        h(
          "div",
          { class: "chart-grid two" },
          heatmapBoxes.map((box, i) => h("div", {}, h("h3", { class: `chart-title swatch-${i ? "b" : "a"}` }, this.name(i)), box)),
        ),
      ),
    );
    this.renderDiff(diffBox);
    this.curves = new CurveOverlay(curvesBox, {
      idPrefix: "compare",
      runs: [0, 1].map((i) => ({ label: this.name(i), color: COLORS[i] })),
      trainAccuracy: true,
    });
    this.heatmaps = this.feeds.map((feed, i) => new LayerHeatmap(heatmapBoxes[i], feed, { statistic: this.statistic }));
    this.shareColourScale();
    this.renderSummary();
    this.updateCharts();
  }

  /** One colour scale over both jobs' values, so equal colours mean equal values on both sides. */
  shareColourScale() {
    let low = Infinity;
    let high = -Infinity;
    for (const feed of this.feeds) {
      for (const row of feed.layerMatrix(this.statistic)) {
        for (const v of row) {
          if (v === null) continue;
          low = Math.min(low, v);
          high = Math.max(high, v);
        }
      }
    }
    const range = low <= high ? [low, high] : null;
    for (const heatmap of this.heatmaps) heatmap.setFixedRange(range);
  }

  renderDiff(box) {
    const [a, b] = this.feeds.map((feed) => flatten(feed.job.spec));
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].filter((k) => show(a[k]) !== show(b[k]));
    const same = ["seed", "model", "workers"].filter((k) => show(a[k]) === show(b[k])).map((k) => `${k} = ${show(a[k])}`);
    if (!keys.length) {
      replace(box, h("p", {}, "The two specs are identical."));
      return;
    }
    replace(
      box,
      h(
        "table",
        { class: "diff" },
        h("thead", {}, h("tr", {}, h("th", {}, "field"), h("th", { class: "swatch-a" }, "A"), h("th", { class: "swatch-b" }, "B"))),
        h("tbody", {}, keys.map((k) => h("tr", { "data-field": k }, h("td", {}, h("code", {}, k)), h("td", {}, show(a[k])), h("td", {}, show(b[k]))))),
      ),
      same.length ? h("p", { class: "muted small" }, `Same: ${same.join(", ")}.`) : null,
    );
  }

  renderSummary() {
    replace(
      this.summaryBox,
      this.feeds.map((feed, i) => {
        const job = feed.job;
        const s = job.summary;
        return h(
          "div",
          { class: `card compare-card swatch-${i ? "b" : "a"}`, "data-job-id": job.id },
          h("div", { class: "card-label" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, this.name(i)), " ", statusBadge(job.status)),
          h(
            "div",
            { class: "card-value" },
            `best val acc ${pct(s.best_val_acc)} · final loss ${num(s.final_train_loss)} · `
              + `${s.epochs_done}/${job.spec.epochs} epochs · ${num(mean(feed.steps.samples_per_s), 3)} samples/s`,
          ),
        );
      }),
    );
  }

  updateCharts() {
    this.curves.update(this.feeds);
  }

  onChange(changed) {
    if (changed.has("job") || changed.has("steps") || changed.has("epochs")) this.renderSummary();
    if (changed.has("steps") || changed.has("epochs")) this.updateCharts();
    if (changed.has("layers")) {
      for (const heatmap of this.heatmaps) heatmap.update();
      this.shareColourScale();
    }
  }

  unmount() {
    for (const unsubscribe of this.unsubscribers || []) unsubscribe();
    for (const feed of this.feeds) feed.stop();
    this.curves?.destroy();
    for (const heatmap of this.heatmaps) heatmap.destroy();
  }
}
