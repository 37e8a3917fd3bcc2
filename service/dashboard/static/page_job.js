// The job page (#/jobs/<id>): status and summary, live curves, the BatchNorm layer view, the log and the spec.

import { align, Chart, PALETTE } from "./charts.js";
import {
  duration,
  elapsed,
  h,
  isTerminal,
  jobLabel,
  num,
  pct,
  progressBar,
  replace,
  shortId,
  showLoadError,
  statusBadge,
  when,
} from "./dom.js";
import { JobFeed } from "./job_feed.js";
import { LayerDetail, LayerHeatmap, STATISTICS, statisticHelp, statisticSelect } from "./layer_view.js";

const STREAM_TEXT = {
  idle: "not connected",
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  ended: "complete",
  unauthorized: "needs a token",
  error: "stream error",
};

/** Median of the last `n` finite values of an array (a steadier throughput figure than the last point). */
function recentMedian(values, n = 10) {
  const recent = values.slice(-n).filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  return recent.length ? recent[Math.floor(recent.length / 2)] : null;
}

/** Curves of one job: loss, accuracy, learning rate and throughput against step or epoch. */
export class JobCurves {
  constructor(container, feed) {
    this.container = container;
    this.feed = feed;
    this.axis = "step";
    this.charts = {};
    this.build();
  }

  setAxis(axis) {
    this.axis = axis;
    this.build();
  }

  build() {
    for (const chart of Object.values(this.charts)) chart.destroy();
    const xLabel = this.axis;
    const boxes = {
      loss: h("div", { id: "chart-loss" }),
      accuracy: h("div", { id: "chart-accuracy" }),
      lr: h("div", { id: "chart-lr" }),
      throughput: h("div", { id: "chart-throughput" }),
    };
    replace(this.container, Object.values(boxes));
    this.charts = {
      loss: new Chart(boxes.loss, {
        title: "Loss",
        xLabel,
        yLabel: "loss",
        series: [
          { label: "train (step)", color: PALETTE.blue, width: 1.5 },
          { label: "train (epoch)", color: PALETTE.sky, points: true, dash: [4, 3] },
          { label: "validation", color: PALETTE.orange, points: true },
        ],
      }),
      accuracy: new Chart(boxes.accuracy, {
        title: "Accuracy",
        xLabel,
        yLabel: "accuracy",
        yRange: [0, 1],
        empty: "No epoch finished yet.",
        series: [
          { label: "train", color: PALETTE.blue, points: true, dash: [4, 3] },
          { label: "validation", color: PALETTE.orange, points: true },
          { label: "validation, precise BN", color: PALETTE.green, points: true },
        ],
      }),
      lr: new Chart(boxes.lr, {
        title: "Learning rate",
        xLabel,
        yLabel: "lr",
        series: [{ label: "learning rate", color: PALETTE.green }],
      }),
      throughput: new Chart(boxes.throughput, {
        title: "Throughput",
        xLabel,
        yLabel: "samples/s",
        series: [{ label: "samples/s (all workers)", color: PALETTE.purple }],
      }),
    };
    this.update();
  }

  /** x values of the step points and the epoch points on the chosen axis. */
  xValues() {
    const { steps, epochs } = this.feed;
    if (this.axis === "epoch") {
      // Step points sit at fractional epochs once the epoch length is known (the first epoch's end, or the
      // spec's cap); before that only the epoch points can be placed.
      const perEpoch = this.feed.stepsPerEpoch();
      return { stepX: perEpoch ? steps.step.map((s) => s / perEpoch) : [], epochX: epochs.map((e) => e.epoch) };
    }
    return { stepX: steps.step, epochX: epochs.map((e) => e.step) };
  }

  update() {
    const { steps, epochs } = this.feed;
    const { stepX, epochX } = this.xValues();
    const column = (key) => epochs.map((e) => e[key]);
    this.charts.loss.setData(
      align([
        { x: stepX, y: steps.train_loss },
        { x: epochX, y: column("train_loss") },
        { x: epochX, y: column("val_loss") },
      ]),
    );
    this.charts.accuracy.setData(
      align([
        { x: epochX, y: column("train_acc") },
        { x: epochX, y: column("val_acc") },
        { x: epochX, y: column("val_acc_precise") },
      ]),
    );
    this.charts.lr.setData(align([{ x: stepX, y: steps.lr }]));
    this.charts.throughput.setData(align([{ x: stepX, y: steps.samples_per_s }]));
  }

  destroy() {
    for (const chart of Object.values(this.charts)) chart.destroy();
  }
}

export class JobPage {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.jobId = params.id;
    this.feed = new JobFeed(ctx.api, this.jobId);
    this.statistic = STATISTICS[0].key;
    this.shownLogs = 0;
  }

  async mount(root) {
    this.root = root;
    replace(root, h("p", { class: "muted" }, "Loading job…"));
    try {
      await this.feed.start(this.statistic); // the heatmap's history: the statistic it shows first only
    } catch (error) {
      showLoadError(root, error, { title: "Job", id: this.jobId, backHref: "#/jobs", backText: "Back to the job list" });
      return;
    }
    this.render();
    this.unsubscribe = this.feed.subscribe((changed) => this.onChange(changed));
  }

  render() {
    this.head = h("section", { class: "job-head" });
    this.cards = h("section", { class: "cards", "aria-label": "Summary" });
    this.errorBox = h("div", { class: "error-box", role: "alert", hidden: true, id: "job-error" });
    this.warningBox = h("div", { class: "warning-box", role: "status", hidden: true, id: "job-warning" });
    const curvesBox = h("div", { class: "chart-grid", id: "curves" });
    const axisToggle = h(
      "fieldset",
      { class: "axis-toggle" },
      h("legend", {}, "x axis"),
      ["step", "epoch"].map((axis) =>
        h(
          "label",
          {},
          h("input", {
            type: "radio",
            name: "x-axis",
            value: axis,
            checked: axis === "step",
            onchange: () => this.curves.setAxis(axis),
          }),
          ` ${axis}`,
        ),
      ),
    );
    const heatmapBox = h("div", { id: "layer-heatmap" });
    this.detailBox = h("section", { class: "layer-detail", id: "layer-detail", hidden: true });
    this.statHelp = h("p", { class: "help", id: "layer-stat-help" }, statisticHelp(this.statistic));
    const logScale = h("input", {
      type: "checkbox",
      id: "layer-log-scale",
      onchange: () => this.heatmap.setLogScale(logScale.checked),
    });
    this.logList = h("ol", { class: "log-lines", id: "log-lines" });
    this.logCount = h("span", { class: "muted" });
    replace(
      this.root,
      this.head,
      this.errorBox,
      this.warningBox,
      this.cards,
      h(
        "section",
        { class: "panel" },
        h("div", { class: "panel-head" }, h("h2", {}, "Training curves"), axisToggle),
        curvesBox,
      ),
      h(
        "section",
        { class: "panel", id: "layers" },
        h(
          "div",
          { class: "panel-head" },
          h("h2", {}, "BatchNorm layers"),
          h(
            "div",
            { class: "controls" },
            h("label", { for: "layer-stat" }, "Statistic "),
            statisticSelect(this.statistic, (key) => {
              this.statistic = key;
              this.statHelp.textContent = statisticHelp(key);
              this.heatmap.setStatistic(key);
            }),
            h("label", { class: "inline" }, logScale, " log colour scale"),
          ),
        ),
        this.statHelp,
        h("p", { class: "help" }, "Rows: layers in model order; columns: recorded steps. Click a layer or a cell."),
        heatmapBox,
        this.detailBox,
      ),
      h(
        "details",
        { class: "panel", id: "log" },
        h("summary", {}, h("h2", { class: "inline" }, "Log"), " ", this.logCount),
        this.logList,
      ),
      h(
        "details",
        { class: "panel", id: "spec" },
        h("summary", {}, h("h2", { class: "inline" }, "Spec")),
        h("pre", { class: "spec-json" }, JSON.stringify(this.feed.job.spec, null, 2)),
      ),
    );
    this.curves = new JobCurves(curvesBox, this.feed);
    this.heatmap = new LayerHeatmap(heatmapBox, this.feed, {
      statistic: this.statistic,
      onSelect: (layer, column) => this.openLayer(layer, column),
    });
    this.detail = new LayerDetail(this.detailBox, this.ctx.api, this.jobId);
    this.renderJob();
    this.renderLogs();
  }

  openLayer(layer, column) {
    if (!layer) return;
    const step = column >= 0 ? this.feed.layerSteps[column] : null;
    this.heatmap.select(layer, column);
    this.detail.open(layer, step ?? null);
  }

  onChange(changed) {
    if (changed.has("job") || changed.has("stream") || changed.has("steps")) this.renderJob();
    if (changed.has("steps") || changed.has("epochs")) this.curves.update();
    if (changed.has("layers")) {
      this.heatmap.update();
      if (this.detail.layer) this.detail.refresh();
    }
    if (changed.has("logs")) this.renderLogs();
  }

  renderJob() {
    const job = this.feed.job;
    const spec = job.spec;
    const summary = job.summary;
    document.title = `${job.name || shortId(job.id)} · syncbn`;
    this.root.dataset.status = job.status;
    const stream = this.feed.streamState;
    const actions = [];
    if (!isTerminal(job.status)) {
      actions.push(
        h(
          "button",
          { type: "button", class: "danger", id: "cancel-job", disabled: job.cancel_requested, onclick: () => this.cancel() },
          job.cancel_requested ? "Stopping…" : "Cancel",
        ),
      );
    } else {
      actions.push(h("button", { type: "button", class: "danger", id: "delete-job", onclick: () => this.remove() }, "Delete"));
    }
    if (job.has_model) {
      actions.push(h("button", { type: "button", id: "download-model", onclick: () => this.downloadModel() }, "Download model"));
    }
    actions.push(
      h("a", { class: "button", href: `#/new?from=${encodeURIComponent(job.id)}` }, "Clone"),
      h(
        "a",
        { class: "button", id: "rerun-flipped", href: `#/new?from=${encodeURIComponent(job.id)}&flip=sync_bn` },
        `Re-run with sync_bn ${spec.sync_bn ? "off" : "on"}`,
      ),
      h("a", { class: "button", href: `#/compare?a=${encodeURIComponent(job.id)}` }, "Compare…"),
      h(
        "a",
        { class: "button", id: "study-syncbn", href: `#/studies/new?from=${encodeURIComponent(job.id)}`, title: "Run this job with sync_bn on and off over 3 seeds, and get a verdict" },
        "Study: is SyncBN worth it here?",
      ),
    );
    replace(
      this.head,
      h(
        "div",
        { class: "title-row" },
        h("h1", { id: "job-title" }, job.name || `Job ${shortId(job.id)}`),
        statusBadge(job.status),
        h(
          "span",
          { class: `stream-state stream-${stream}`, id: "stream-state", "data-state": stream, title: this.feed.streamDetail },
          STREAM_TEXT[stream] || stream,
        ),
      ),
      h(
        "p",
        { class: "muted" },
        "id ",
        h("code", { id: "job-id" }, job.id),
        job.study_id
          ? [
              " · trial of ",
              h("a", { id: "job-study", href: `#/studies/${encodeURIComponent(job.study_id)}` }, `study ${shortId(job.study_id)}`),
              ` (arm ${job.study_arm}, seed ${job.study_seed})`,
            ]
          : null,
      ),
      h("div", { class: "actions" }, actions),
    );
    this.errorBox.hidden = !job.error;
    replace(this.errorBox, job.error ? [h("strong", {}, `${job.status}: `), job.error] : []);
    this.warningBox.hidden = !summary.warning;
    replace(this.warningBox, summary.warning ? [h("strong", {}, "warning: "), summary.warning] : []);

    const throughput = recentMedian(this.feed.steps.samples_per_s);
    const queue = job.status === "queued" && job.queue_position ? ` (#${job.queue_position} in the queue)` : "";
    const cards = [
      ["Progress", progressBar(summary.epochs_done, spec.epochs, `${summary.epochs_done} / ${spec.epochs} epochs`), "card-progress"],
      ["Step", summary.last_step ?? "–", "card-step"],
      ["Validation accuracy", `${pct(summary.last_val_acc)} (best ${pct(summary.best_val_acc)})`, "card-acc"],
      ...(spec.precise_bn
        ? [[
            "Precise BN",
            `${pct(this.lastEpoch()?.val_acc ?? summary.last_val_acc)} EMA · `
              + `${pct(summary.final_val_acc_precise ?? this.lastPrecise())} precise`
              + ` (${spec.precise_bn.batches} batches, every ${spec.precise_bn.every})`,
            "card-precise-bn",
          ]]
        : []),
      ["Train loss", num(summary.final_train_loss ?? this.lastEpoch()?.train_loss ?? null), "card-loss"],
      ["Verdict", summary.verdict || (isTerminal(job.status) ? "–" : `${job.status}${queue}`), "card-verdict"],
      ["Throughput", throughput === null ? "–" : `${num(throughput, 3)} samples/s`, "card-throughput"],
      [
        "Workers",
        `${spec.workers} × ${spec.cpus_per_worker} CPU${spec.use_gpu ? " + 1 GPU" : ""} · sync_bn ${spec.sync_bn ? "on" : "off"}`
          + (spec.sync_group_size ? ` (groups of ${spec.sync_group_size})` : ""),
        "card-workers",
      ],
      [
        "Model / data",
        `${spec.model} on ${spec.dataset.kind} · batch ${spec.batch_size}/worker · seed ${spec.seed}`,
        "card-model",
      ],
      [
        "Precision",
        `${spec.precision || "fp32"}${spec.channels_last ? " · channels_last" : ""}${spec.compile ? " · compiled" : ""}`,
        "card-precision",
      ],
      [
        "Time",
        `submitted ${when(job.created_at)}`
          + (job.started_at ? ` · ran ${duration(elapsed(job.started_at, job.finished_at))}` : ""),
        "card-time",
      ],
    ];
    replace(
      this.cards,
      cards.map(([label, value, id]) => h("div", { class: "card", id }, h("div", { class: "card-label" }, label), h("div", { class: "card-value" }, value))),
    );
  }

  lastEpoch() {
    const epochs = this.feed.epochs;
    return epochs.length ? epochs[epochs.length - 1] : null;
  }

  /** The latest epoch's validation accuracy with precise BatchNorm statistics, or null before any. */
  lastPrecise() {
    const done = this.feed.epochs.filter((e) => e.val_acc_precise !== null && e.val_acc_precise !== undefined);
    return done.length ? done[done.length - 1].val_acc_precise : null;
  }

  renderLogs() {
    const logs = this.feed.logs;
    if (logs.length < this.shownLogs) {
      replace(this.logList);
      this.shownLogs = 0;
    }
    for (const line of logs.slice(this.shownLogs)) {
      this.logList.append(
        h(
          "li",
          { class: `log-${line.level}` },
          h("time", {}, when(line.at)),
          h("span", { class: "log-level" }, line.level),
          h("span", { class: "log-source" }, line.source),
          h("span", { class: "log-message" }, line.message),
        ),
      );
    }
    this.shownLogs = logs.length;
    this.logCount.textContent = `${logs.length} line${logs.length === 1 ? "" : "s"}`;
  }

  async cancel() {
    const job = this.feed.job;
    try {
      const answer = await this.ctx.api.post(`v1/jobs/${encodeURIComponent(job.id)}/cancel`);
      this.ctx.flash(
        answer.status === "cancelled" ? `Job ${jobLabel(job)} cancelled.` : `Job ${jobLabel(job)} is stopping.`,
      );
      this.feed.job = { ...this.feed.job, ...answer };
      this.renderJob();
    } catch (error) {
      this.ctx.flash(`Could not cancel: ${error.message}`, "error");
    }
  }

  async remove() {
    const job = this.feed.job;
    if (!window.confirm(`Delete job ${jobLabel(job)} with its metrics, statistics, logs and files?`)) return;
    try {
      await this.ctx.api.del(`v1/jobs/${encodeURIComponent(job.id)}`);
      this.ctx.flash(`Job ${jobLabel(job)} deleted.`);
      this.ctx.navigate("#/jobs");
    } catch (error) {
      this.ctx.flash(`Could not delete: ${error.message}`, "error");
    }
  }

  async downloadModel() {
    const job = this.feed.job;
    try {
      await this.ctx.api.download(`v1/jobs/${encodeURIComponent(job.id)}/model`, `${job.id}-model.pt`);
    } catch (error) {
      this.ctx.flash(`Could not download the model: ${error.message}`, "error");
    }
  }

  unmount() {
    this.unsubscribe?.();
    this.feed.stop();
    this.curves?.destroy();
    this.heatmap?.destroy();
    this.detail?.destroy();
  }
}
