// The per-layer BatchNorm view: a heatmap of layers x recorded steps for one statistic, and, for a clicked
// layer, its per-channel batch and running means and variances at one step and their history over the run.
//
// The heatmap draws the layer summaries its JobFeed holds (read for the statistic on screen, then kept current
// from the event stream); choosing another statistic asks the feed for that one and shows "Loading…" until it is
// here. The per-channel lists are not on the stream, so the layer detail reads them on demand from
// GET /v1/jobs/{id}/layers/{layer}: the snapshots the store keeps (the recent ones and a log-spaced selection of
// older ones), at most DETAIL_POINTS, in the binary form (float32 tensors: a 2,048-channel layer's 120 snapshots
// are 3.9 MB instead of ~10 MB of JSON, and the server writes them without building a float per value).

import { align, Chart, PALETTE } from "./charts.js";
import { h, num, replace } from "./dom.js";
import { Heatmap } from "./heatmap.js";
import { readSafetensors, rowOf, SAFETENSORS } from "./safetensors.js";

/** Most snapshots the layer detail asks for (the server downsamples the kept ones evenly to this). */
const DETAIL_POINTS = 120;

/** The statistics a heatmap can show: keys of the layer summaries (syncbn.merge_rank_layer_stats). */
export const STATISTICS = [
  {
    key: "skew_between_share_max",
    label: "Cross-worker skew: between-rank share of variance (max over channels)",
    help: "How much of a channel's batch variance comes from the ranks' means differing. Local BatchNorm "
      + "normalizes every rank with its own moments, so a high share means the ranks' models see different data.",
  },
  {
    key: "skew_max_gap",
    label: "Cross-worker skew: largest rank-mean gap (in σ)",
    help: "Largest |rank mean − global mean| over ranks and channels, in units of the global standard deviation.",
  },
  {
    key: "drift_mean",
    label: "Running vs batch drift: mean over channels (in σ)",
    help: "|running mean − batch mean| / √(running var + eps): how far the statistics used at evaluation are "
      + "from the batch's.",
  },
  { key: "drift_max", label: "Running vs batch drift: max over channels (in σ)", help: "The worst channel's drift." },
  { key: "batch_var_mean", label: "Batch variance: mean over channels", help: "Global batch variance, averaged." },
  { key: "batch_var_min", label: "Batch variance: min over channels", help: "The smallest channel variance." },
  {
    key: "dead_channels",
    label: "Dead channels (batch variance < eps)",
    help: "Channels whose inputs were constant over the global batch.",
  },
  { key: "weight_mean", label: "γ (weight): mean over channels", help: "The layer's scale parameter." },
  { key: "weight_grad_norm", label: "γ gradient norm", help: "Norm of the scale parameter's gradient (rank 0)." },
];

/** A <select> of STATISTICS; `onChange(key)` when the choice changes. */
export function statisticSelect(selected, onChange, id = "layer-stat") {
  const select = h(
    "select",
    { id, name: "statistic", onchange: () => onChange(select.value) },
    STATISTICS.map((s) => h("option", { value: s.key, selected: s.key === selected }, s.label)),
  );
  return select;
}

export function statisticHelp(key) {
  return STATISTICS.find((s) => s.key === key)?.help || "";
}

/**
 * The heatmap of one job's layers for one statistic, kept current from its JobFeed (call `update()` when the feed
 * notifies "layers"). It draws only the statistic chosen last: while the feed reads it, the heatmap says so
 * instead of drawing empty cells, and an answer for a statistic chosen before changes nothing on screen.
 */
export class LayerHeatmap {
  constructor(container, feed, { onSelect, statistic = STATISTICS[0].key } = {}) {
    this.feed = feed;
    this.heatmap = new Heatmap(container, {
      rowButtons: true,
      rowLabel: "layer",
      columnLabel: "step",
      onSelect: (row, column) => onSelect?.(feed.layerNames[row], column),
    });
    this.setStatistic(statistic);
  }

  /** Show `key`: read it first when the feed does not hold its history yet (the feed reads each key once). */
  setStatistic(key) {
    this.statistic = key;
    this.feed.loadStatistic(key);
    this.update();
  }

  setLogScale(on) {
    this.heatmap.setLogScale(on);
  }

  setFixedRange(range) {
    this.heatmap.setFixedRange(range);
  }

  update() {
    const state = this.feed.statisticState(this.statistic);
    const label = STATISTICS.find((s) => s.key === this.statistic)?.label || this.statistic;
    this.heatmap.container.dataset.statistic = this.statistic;
    if (state === "error") {
      this.heatmap.setStatus(`Could not read “${label}”: ${this.feed.statisticError(this.statistic)}`, "error");
      return;
    }
    if (state !== "ready") {
      this.heatmap.setStatus(`Loading “${label}”…`, "loading");
      return;
    }
    if (this.heatmap.status) this.heatmap.setStatus(null);
    this.heatmap.setData(this.feed.layerNames, this.feed.layerSteps, this.feed.layerMatrix(this.statistic));
  }

  select(layer, column) {
    this.heatmap.select(this.feed.layerNames.indexOf(layer), column);
  }

  destroy() {
    this.heatmap.destroy();
  }
}

/** One layer in detail: per-channel statistics at a chosen step, and their history as channel x step heatmaps. */
export class LayerDetail {
  constructor(container, api, jobId) {
    this.container = container;
    this.api = api;
    this.jobId = jobId;
    this.layer = null;
    this.points = [];
    this.index = -1;
    this.charts = [];
    this.heatmaps = [];
    this.loading = null;
  }

  path(layer) {
    return `v1/jobs/${encodeURIComponent(this.jobId)}/layers/${encodeURIComponent(layer)}`;
  }

  /** The layer's history in the binary form, as the JSON form's points: `{step, epoch, stats}` with lists. */
  async history(layer, query) {
    const { tensors, metadata } = readSafetensors(await this.api.getBinary(this.path(layer), query, SAFETENSORS));
    return metadata.summaries.map((summary, i) => {
      const stats = { ...summary };
      for (const key of ["mean", "var", "running_mean", "running_var"]) {
        if (tensors[key]) stats[key] = rowOf(tensors[key], i);
      }
      return { step: Number(tensors.step.data[i]), epoch: Number(tensors.epoch.data[i]), stats };
    });
  }

  /** Show `layer` at the recorded step `step` (default: the latest). */
  async open(layer, step = null) {
    this.layer = layer;
    this.container.hidden = false;
    this.container.dataset.layer = layer;
    replace(this.container, h("p", { class: "muted" }, `Loading ${layer}…`));
    try {
      const points = await this.history(layer, { max_points: DETAIL_POINTS });
      if (this.layer !== layer) return;
      this.points = points;
    } catch (error) {
      replace(this.container, h("p", { class: "error-text" }, `Could not read layer ${layer}: ${error.message}`));
      return;
    }
    // A clicked step may no longer keep its per-channel vectors: show the nearest snapshot that does.
    let at = this.points.length - 1;
    if (step !== null) {
      for (let i = 0; i < this.points.length; i++) {
        if (Math.abs(this.points[i].step - step) < Math.abs(this.points[at].step - step)) at = i;
      }
    }
    this.index = at;
    this.render();
  }

  /** Append the points recorded since the last one shown (a running job). */
  async refresh() {
    if (!this.layer || !this.points.length || this.loading) return;
    const layer = this.layer;
    const last = this.points[this.points.length - 1].step;
    this.loading = this.history(layer, { since_step: last, max_points: DETAIL_POINTS });
    try {
      const points = await this.loading;
      if (this.layer !== layer || !points.length) return;
      const following = this.index === this.points.length - 1;
      this.points.push(...points);
      if (following) this.index = this.points.length - 1;
      this.render();
    } catch {
      // the next refresh tries again
    } finally {
      this.loading = null;
    }
  }

  close() {
    this.layer = null;
    this.destroyParts();
    this.container.hidden = true;
    replace(this.container);
  }

  destroyParts() {
    for (const chart of this.charts) chart.destroy();
    for (const heatmap of this.heatmaps) heatmap.destroy();
    this.charts = [];
    this.heatmaps = [];
  }

  render() {
    this.destroyParts();
    const point = this.points[this.index];
    if (!point) {
      replace(this.container, h("p", { class: "muted" }, `No statistics recorded for ${this.layer} yet.`));
      return;
    }
    const stats = point.stats;
    const slider = h("input", {
      type: "range",
      id: "layer-step",
      min: 0,
      max: this.points.length - 1,
      value: this.index,
      "aria-label": "recorded step",
      oninput: () => this.showStep(Number(slider.value)),
    });
    this.stepLabel = h("span", { class: "step-label", id: "layer-step-label" });
    this.facts = h("dl", { class: "facts" });
    const meanBox = h("div", { id: "channel-means" });
    const varBox = h("div", { id: "channel-vars" });
    const meanHistory = h("div", { id: "mean-history" });
    const varHistory = h("div", { id: "var-history" });
    replace(
      this.container,
      h(
        "div",
        { class: "detail-head" },
        h("h3", {}, "Layer ", h("code", { id: "layer-name" }, this.layer)),
        h(
          "span",
          { class: "muted" },
          `${stats.channels ?? "?"} channels · ${stats.synchronized ? "synchronized" : "local"} BatchNorm · `
            + `${stats.ranks ?? "?"} rank(s)`,
        ),
        h("button", { type: "button", class: "link", onclick: () => this.close() }, "Close"),
      ),
      h("div", { class: "step-picker" }, h("label", { for: "layer-step" }, "Recorded step"), slider, this.stepLabel),
      this.facts,
      h("div", { class: "chart-grid two" }, meanBox, varBox),
      h("h4", {}, "History over the recorded steps (rows: channels)"),
      h(
        "div",
        { class: "chart-grid two" },
        h("div", {}, h("h3", { class: "chart-title" }, "Per-channel batch mean"), meanHistory),
        h("div", {}, h("h3", { class: "chart-title" }, "Per-channel batch variance"), varHistory),
      ),
    );
    this.meanChart = new Chart(meanBox, {
      title: "Per-channel mean",
      xLabel: "channel",
      yLabel: "mean",
      bars: true,
      series: [
        { label: "batch mean (global)", color: PALETTE.blue },
        { label: "running mean", color: PALETTE.orange, pointsOnly: true },
      ],
    });
    this.varChart = new Chart(varBox, {
      title: "Per-channel variance",
      xLabel: "channel",
      yLabel: "variance",
      bars: true,
      yRange: (_, __, max) => [0, max > 0 ? max * 1.08 : 1], // variances start at 0: bars keep their true heights
      series: [
        { label: "batch variance (global)", color: PALETTE.green },
        { label: "running variance", color: PALETTE.red, pointsOnly: true },
      ],
    });
    this.charts = [this.meanChart, this.varChart];
    const steps = this.points.map((p) => p.step);
    const select = (_, column) => {
      slider.value = String(column);
      this.showStep(column);
    };
    for (const [box, key] of [
      [meanHistory, "mean"],
      [varHistory, "var"],
    ]) {
      const heatmap = new Heatmap(box, { rowLabel: "channel", columnLabel: "step", maxHeight: 260, onSelect: select });
      const channels = stats.channels ?? (stats[key] || []).length;
      const rows = Array.from({ length: channels }, (_, c) => String(c));
      const values = rows.map((_, c) => this.points.map((p) => p.stats[key]?.[c] ?? null));
      heatmap.setData(rows, steps, values);
      this.heatmaps.push(heatmap);
    }
    this.showStep(this.index);
  }

  showStep(index) {
    this.index = index;
    const point = this.points[index];
    const stats = point.stats;
    this.stepLabel.textContent = `step ${point.step} (epoch ${point.epoch}), ${index + 1} of ${this.points.length}`;
    this.container.dataset.step = String(point.step);
    const channels = (stats.mean || []).map((_, c) => c);
    this.meanChart.setData(align([
      { x: channels, y: stats.mean || [] },
      { x: channels, y: stats.running_mean || [] },
    ]));
    this.varChart.setData(align([
      { x: channels, y: stats.var || [] },
      { x: channels, y: stats.running_var || [] },
    ]));
    for (const heatmap of this.heatmaps) heatmap.select(-1, index);
    const facts = [
      ["dead channels", stats.dead_channels],
      ["drift (mean / max)", `${num(stats.drift_mean, 3)} / ${num(stats.drift_max, 3)}`],
      ["skew share (mean / max)", `${num(stats.skew_between_share_mean, 3)} / ${num(stats.skew_between_share_max, 3)}`],
      ["largest rank gap", num(stats.skew_max_gap, 3)],
      ["ranks agree", stats.ranks_agree === null || stats.ranks_agree === undefined ? "–" : String(stats.ranks_agree)],
      ["γ mean [min, max]", `${num(stats.weight_mean, 3)} [${num(stats.weight_min, 3)}, ${num(stats.weight_max, 3)}]`],
      ["β mean [min, max]", `${num(stats.bias_mean, 3)} [${num(stats.bias_min, 3)}, ${num(stats.bias_max, 3)}]`],
      ["grad norm γ / β", `${num(stats.weight_grad_norm, 3)} / ${num(stats.bias_grad_norm, 3)}`],
      ["samples per rank", (stats.per_rank_count || []).map((c) => num(c, 4)).join(", ") || "–"],
    ];
    replace(this.facts, facts.map(([term, value]) => [h("dt", {}, term), h("dd", {}, String(value ?? "–"))]));
  }

  destroy() {
    this.destroyParts();
  }
}
