// One study (#/studies/<id>): does the reference arm (by default SyncBatchNorm) pay on this data?
//
// What it shows, top to bottom: the verdict (the API's sentence, then the same numbers in plain words); each arm's
// metric (mean, its confidence interval as a whisker and each seed's best value as a dot), throughput and wall
// time; the paired difference of the reference against each other arm, drawn against the band of differences too
// small to matter (the verdict's margin, else the spec's); every trial with a link to its job page; the trials'
// curves overlaid (the compare page's charts); and the cross-worker skew of the local arm.
//
// The skew view is the heatmap of ONE local-arm trial (a seed picker switches trial), layers x recorded steps of
// skew_between_share_mean, the statistic the verdict ranks layers by, with the verdict's ranking (pooled over the
// local arm's trials and steps) listed beside it. One trial rather than the ranking alone: the ranking says which
// layers disagree but not when (early in training, or throughout), which the heatmap shows; and one trial rather
// than an average over seeds, because the trials' recorded steps need not line up. It is one small read
// (GET /layer-summaries with one key), whatever the run's length.
//
// Live: the page follows GET /v1/studies/{id}/events (a `trial` event per status change, a `study` event with the
// verdict after each trial that ends) and re-reads a trial's metrics when it ends; running trials' metrics are
// polled for their new points, so their curves grow.

import { PALETTE } from "./charts.js";
import { CurveOverlay, stepColumns } from "./curve_overlay.js";
import { duration, h, isTerminal, num, replace, shortId, showLoadError, statusBadge, when } from "./dom.js";
import { Heatmap } from "./heatmap.js";
import { intervalPlot } from "./interval_plot.js";

/** Colours of the arms (the reference first), in the charts' palette. */
const ARM_COLORS = [PALETTE.blue, PALETTE.orange, PALETTE.green, PALETTE.red, PALETTE.purple, PALETTE.sky, PALETTE.grey, "#8c564b"];
/** Dash patterns telling a study's seeds apart on the overlaid curves (solid for the first seed). */
const SEED_DASHES = [null, [6, 3], [2, 3], [10, 3, 2, 3], [1, 5], [12, 5], [4, 2, 1, 2], [8, 8], [3, 6], [14, 2]];
/** How often the metrics of running trials are read for their new points. */
const POLL_MS = 3000;
/** The layer statistic the verdict ranks layers by (service/store/study_results.py, SKEW_KEY). */
const SKEW_KEY = "skew_between_share_mean";
/** Most recorded steps (columns) of the skew heatmap. */
const HEATMAP_STEPS = 400;

const STREAM_TEXT = {
  idle: "not connected",
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  ended: "complete",
  unauthorized: "needs a token",
  error: "stream error",
};

const OUTCOME_TEXT = { pays: "pays", does_not_pay: "does not pay", inconclusive: "inconclusive" };

/** The outcome of a verdict as a coloured badge ("no verdict yet" without one). */
export function outcomeBadge(verdict) {
  const outcome = verdict?.outcome || "none";
  return h("span", { class: `badge outcome-${outcome}`, "data-outcome": outcome }, OUTCOME_TEXT[outcome] || "no verdict yet");
}

/** How to show values of the study's metric: accuracy in percent and differences in points, loss as is. */
function metricFormat(metric) {
  if (metric === "val_accuracy") {
    return {
      words: "validation accuracy",
      higherIsBetter: true,
      value: (v) => (Number.isFinite(v) ? `${(v * 100).toFixed(2)}%` : "–"),
      tick: (v) => `${(v * 100).toFixed(1)}%`,
      difference: (v) => (Number.isFinite(v) ? `${v >= 0 ? "+" : "−"}${Math.abs(v * 100).toFixed(2)} points` : "–"),
      diffTick: (v) => `${v > 0 ? "+" : ""}${(v * 100).toFixed(1)}`,
      diffUnit: "points of validation accuracy",
    };
  }
  return {
    words: "validation loss",
    higherIsBetter: false,
    value: (v) => num(v, 4),
    tick: (v) => num(v, 3),
    difference: (v) => (Number.isFinite(v) ? `${v >= 0 ? "+" : "−"}${num(Math.abs(v), 4)}` : "–"),
    diffTick: (v) => `${v > 0 ? "+" : ""}${num(v, 3)}`,
    diffUnit: "validation loss",
  };
}

/** The seeds every arm runs (the spec's N means 0..N-1). */
function seedList(spec) {
  return Array.isArray(spec.seeds) ? spec.seeds : Array.from({ length: spec.seeds }, (_, i) => i);
}

/** Whether an arm of the study synchronises BatchNorm (its override, else the base's value). */
function armSyncs(study, arm) {
  const overrides = study.arms[arm]?.overrides || {};
  return overrides.sync_bn ?? study.spec.base.sync_bn;
}

export class StudyPage {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.studyId = params.id;
    this.path = `v1/studies/${encodeURIComponent(this.studyId)}`;
    this.study = null;
    this.results = new Map(); // job id -> {steps, epochs, final (read after the trial ended), best}
    this.streamState = "idle";
    this.streamDetail = "";
    this.stream = null;
    this.poller = null;
    this.polling = false;
    this.renderTimer = null;
    this.curves = null;
    this.heatmap = null;
    this.heatmapTrial = "";
    this.stopped = false;
  }

  async mount(root) {
    this.root = root;
    replace(root, h("p", { class: "muted" }, "Loading study…"));
    try {
      this.study = await this.ctx.api.get(this.path);
    } catch (error) {
      showLoadError(root, error, {
        title: "Study",
        id: this.studyId,
        backHref: "#/studies",
        backText: "Back to the study list",
      });
      return;
    }
    if (this.stopped) return;
    this.render();
    await Promise.all(this.study.trials.map((trial) => this.readMetrics(trial)));
    if (this.stopped) return; // the page went away while the metrics were read
    this.renderResults();
    this.chooseHeatmapTrial();
    this.stream = this.ctx.api.follow(`${this.path}/events`, {
      onEvent: (event) => this.onEvent(event),
      onState: (state, detail) => {
        this.streamState = state;
        this.streamDetail = detail || "";
        this.renderHead();
      },
      reconnect: () => !this.trialsEnded(),
    });
    this.poller = setInterval(() => this.poll(), POLL_MS);
  }

  trialsEnded() {
    return this.study.trials.every((trial) => isTerminal(trial.status));
  }

  labelOf(arm) {
    return this.study.arms[arm]?.label || `arm ${arm}`;
  }

  trialName(trial) {
    return `${this.labelOf(trial.arm)} · seed ${trial.seed}`;
  }

  render() {
    this.head = h("section", { class: "job-head", id: "study-head" });
    this.verdictBox = h("section", { class: "panel verdict-panel", id: "study-verdict" });
    this.armsBox = h("div", { id: "study-arms" });
    this.differenceBox = h("div", { id: "study-difference" });
    this.trialsBox = h("div", { id: "study-trials" });
    const curvesBox = h("div", { class: "chart-grid", id: "study-curves" });
    this.layersBox = h("div", { id: "study-layers" });
    replace(
      this.root,
      this.head,
      this.verdictBox,
      h(
        "section",
        { class: "panel" },
        h("h2", {}, "Arms"),
        h(
          "p",
          { class: "help" },
          "Each arm's best validation result per seed (dots), their mean (diamond) and its confidence interval (whisker), "
            + "over the trials that succeeded.",
        ),
        this.armsBox,
      ),
      h(
        "section",
        { class: "panel" },
        h("h2", {}, "Paired difference"),
        h(
          "p",
          { class: "help" },
          "The reference arm minus each other arm, seed by seed (dots), their mean and its confidence interval. The grey "
            + "band holds the differences too small to matter (± the margin).",
        ),
        this.differenceBox,
      ),
      h("section", { class: "panel" }, h("h2", {}, "Trials"), this.trialsBox),
      h(
        "section",
        { class: "panel" },
        h("h2", {}, "Curves"),
        h("p", { class: "help" }, "Every trial: colour by arm, dash by seed."),
        curvesBox,
      ),
      h("section", { class: "panel", id: "study-skew" }, h("h2", {}, "Cross-worker skew of the local arm"), this.layersBox),
    );
    const seeds = seedList(this.study.spec);
    this.curves = new CurveOverlay(curvesBox, {
      idPrefix: "study",
      runs: this.study.trials.map((trial) => ({
        label: this.trialName(trial),
        color: ARM_COLORS[trial.arm % ARM_COLORS.length],
        dash: SEED_DASHES[seeds.indexOf(trial.seed) % SEED_DASHES.length],
      })),
    });
    this.renderLayersPanel();
    this.renderStudy();
  }

  renderStudy() {
    this.renderHead();
    this.renderVerdict();
    this.renderResults();
  }

  renderHead() {
    if (!this.head) return;
    const study = this.study;
    document.title = `${study.name || `study ${shortId(study.id)}`} · syncbn`;
    this.root.dataset.status = study.status;
    const counts = {};
    for (const trial of study.trials) counts[trial.status] = (counts[trial.status] || 0) + 1;
    const tally = Object.entries(counts).map(([status, n]) => `${n} ${status}`).join(", ");
    const actions = [];
    if (!isTerminal(study.status)) {
      actions.push(h("button", { type: "button", class: "danger", id: "cancel-study", onclick: (e) => this.cancel(e.currentTarget) }, "Cancel study"));
    }
    actions.push(h("a", { class: "button", id: "study-again", href: `#/studies/new?study=${encodeURIComponent(study.id)}` }, "New study from this one"));
    const stream = this.streamState;
    replace(
      this.head,
      h(
        "div",
        { class: "title-row" },
        h("h1", { id: "study-title" }, study.name || `Study ${shortId(study.id)}`),
        statusBadge(study.status),
        h(
          "span",
          { class: `stream-state stream-${stream}`, id: "stream-state", "data-state": stream, title: this.streamDetail },
          STREAM_TEXT[stream] || stream,
        ),
      ),
      h(
        "p",
        { class: "muted" },
        "id ",
        h("code", { id: "study-id" }, study.id),
        ` · ${study.owner} · submitted ${when(study.created_at)} · `,
        `${study.arms.length} arms × ${seedList(study.spec).length} seeds = ${study.trials.length} trials (${tally})`,
      ),
      h("div", { class: "actions" }, actions),
    );
  }

  renderVerdict() {
    const study = this.study;
    const verdict = study.verdict;
    if (!verdict) {
      const done = study.trials.filter((t) => t.status === "succeeded").length;
      replace(
        this.verdictBox,
        h("div", { class: "title-row" }, h("h2", {}, "Verdict"), outcomeBadge(null)),
        h(
          "p",
          { id: "verdict-sentence", class: "verdict-sentence muted" },
          `No verdict yet: it needs at least two seeds of two arms to succeed (${done} of ${study.trials.length} trials have).`,
        ),
      );
      return;
    }
    replace(
      this.verdictBox,
      h("div", { class: "title-row" }, h("h2", {}, "Verdict"), outcomeBadge(verdict)),
      h("p", { id: "verdict-sentence", class: "verdict-sentence" }, verdict.sentence),
      h("ul", { id: "verdict-explained", class: "explained" }, this.explain(verdict).map((line) => h("li", {}, line))),
    );
  }

  /** The verdict's numbers in plain words, for someone who does not read confidence intervals every day. */
  explain(verdict) {
    const fmt = metricFormat(verdict.metric);
    const reference = verdict.arms[0]?.label || "the reference";
    const other = verdict.comparisons[0]?.label || "the other arm";
    const d = verdict.difference;
    const level = `${Math.round(verdict.confidence * 100)} %`;
    const lines = [
      `Every arm ran the same job with the same seeds; for each seed, ${other}'s best ${fmt.words} is subtracted from `
        + `${reference}'s. Pairing by seed cancels what both runs of a seed share (initial weights, data order), so the `
        + "difference shows the arms' own effect.",
    ];
    const better = (d.mean > 0) === fmt.higherIsBetter ? "better" : "worse";
    const size = fmt.difference(Math.abs(d.mean)).replace(/^[+−]/, "");
    lines.push(
      `Over ${d.n_pairs} paired seed${d.n_pairs === 1 ? "" : "s"}, ${reference}'s ${fmt.words} was on average ${size} `
        + `${d.mean >= 0 ? "higher" : "lower"} than ${other}'s: ${better}.`
        + (d.ci_low !== null && d.ci_high !== null
          ? ` The ${level} interval, ${fmt.difference(d.ci_low)} to ${fmt.difference(d.ci_high)}, is the range of true `
            + "differences these seeds are consistent with."
          : ""),
    );
    lines.push(
      `Differences within ±${fmt.difference(verdict.margin).replace(/^[+−]/, "")} count as too small to matter (the grey band).`,
    );
    const inBand = d.ci_low !== null && d.ci_high !== null && d.ci_low >= -verdict.margin && d.ci_high <= verdict.margin;
    if (verdict.outcome === "pays") {
      lines.push(
        `So it pays: the whole interval lies on ${reference}'s better side of zero, and not all of it inside the band.`,
      );
    } else if (verdict.outcome === "does_not_pay") {
      lines.push(
        inBand
          ? "So it does not pay: the whole interval lies inside the band, so whatever the true difference is, it is too small to matter."
          : `So it does not pay: the whole interval lies on ${reference}'s worse side of zero.`,
      );
    } else {
      lines.push(
        "So it is inconclusive: the interval reaches across zero or the edge of the band, so these seeds cannot tell."
          + (verdict.seeds_needed
            ? ` About ${verdict.seeds_needed > 1000 ? "more than 1000" : verdict.seeds_needed} paired seeds would settle a difference of this size.`
            : ""),
      );
    }
    if (d.p_value !== null) {
      lines.push(
        `p = ${num(d.p_value, 3)}: how often seeds would show a difference at least this large if the arms were in fact equal.`,
      );
    }
    if (verdict.cost_ratio !== null) {
      lines.push(
        `Cost: ${other} trained at ${num(verdict.cost_ratio, 3)}× ${reference}'s samples/s, i.e. each of ${reference}'s `
          + `steps took ${num(verdict.cost_ratio, 3)}× as long.`,
      );
    }
    return lines;
  }

  /** Everything drawn from the trials' results: arms, differences, trials, curves (batched: many reads land at once). */
  scheduleResults() {
    if (this.renderTimer !== null || this.stopped) return;
    this.renderTimer = setTimeout(() => {
      this.renderTimer = null;
      this.renderResults();
    }, 150);
  }

  renderResults() {
    if (!this.armsBox) return;
    this.renderArms();
    this.renderDifference();
    this.renderTrials();
    this.curves.update(this.study.trials.map((trial) => this.results.get(trial.job_id) || { steps: stepColumns([]), epochs: [] }));
  }

  /** Each succeeded trial's best value of the metric, by arm and seed. */
  bests() {
    const byArm = this.study.arms.map(() => new Map());
    for (const trial of this.study.trials) {
      const result = this.results.get(trial.job_id);
      if (trial.status === "succeeded" && result && Number.isFinite(result.best)) byArm[trial.arm]?.set(trial.seed, result.best);
    }
    return byArm;
  }

  renderArms() {
    const study = this.study;
    const verdict = study.verdict;
    const fmt = metricFormat(study.spec.metric);
    const bests = this.bests();
    const rows = study.arms.map((arm, index) => {
      const summary = verdict?.arms[index] || null;
      return {
        label: `${index === 0 ? "★ " : ""}${arm.label}`,
        color: ARM_COLORS[index % ARM_COLORS.length],
        mean: summary?.mean ?? null,
        low: summary?.ci_low ?? null,
        high: summary?.ci_high ?? null,
        dots: [...bests[index]].map(([seed, value]) => ({ value, title: `seed ${seed}: ${fmt.value(value)}` })),
      };
    });
    const table = h(
      "table",
      { class: "jobs study-table", id: "arm-table" },
      h(
        "thead",
        {},
        h("tr", {}, ["Arm", "Overrides", `Mean ${fmt.words}`, `${Math.round(study.spec.confidence * 100)} % interval`, "Seeds", "Samples/s", "Wall time"].map((t) => h("th", { scope: "col" }, t))),
      ),
      h(
        "tbody",
        { id: "arm-rows" },
        study.arms.map((arm, index) => {
          const s = verdict?.arms[index] || null;
          return h(
            "tr",
            { "data-arm": index },
            h("td", { class: "arm-label" }, h("i", { class: `arm-swatch arm-${index % ARM_COLORS.length}` }), arm.label, index === 0 ? h("span", { class: "muted small" }, " (reference)") : null),
            h("td", {}, h("code", {}, JSON.stringify(arm.overrides))),
            h("td", { class: "num arm-mean" }, fmt.value(s?.mean ?? NaN)),
            h("td", { class: "num arm-ci" }, s && s.ci_low !== null ? `${fmt.value(s.ci_low)} – ${fmt.value(s.ci_high)}` : "–"),
            h("td", { class: "num arm-n" }, s ? String(s.n) : "0"),
            h("td", { class: "num arm-speed" }, s?.samples_per_s ? num(s.samples_per_s, 4) : "–"),
            h("td", { class: "num arm-wall" }, s?.wall_s !== null && s?.wall_s !== undefined ? duration(s.wall_s) : "–"),
          );
        }),
      ),
    );
    replace(
      this.armsBox,
      intervalPlot({ id: "arms-plot", rows, format: fmt.tick, axisLabel: `best ${fmt.words} per trial` }),
      table,
      verdict ? null : h("p", { class: "muted small" }, "Means and intervals appear with the verdict."),
    );
  }

  renderDifference() {
    const study = this.study;
    const verdict = study.verdict;
    const fmt = metricFormat(study.spec.metric);
    const margin = verdict?.margin ?? study.spec.margin;
    const bests = this.bests();
    const reference = study.arms[0]?.label || "reference";
    const comparisons = new Map((verdict?.comparisons || []).map((c) => [c.arm, c]));
    const rows = study.arms.slice(1).map((arm, i) => {
      const index = i + 1;
      const c = comparisons.get(index);
      const dots = [];
      for (const [seed, value] of bests[0]) {
        if (bests[index].has(seed)) {
          const diff = value - bests[index].get(seed);
          dots.push({ value: diff, title: `seed ${seed}: ${fmt.difference(diff)}` });
        }
      }
      return {
        label: `− ${arm.label}`,
        color: ARM_COLORS[index % ARM_COLORS.length],
        mean: c?.difference.mean ?? null,
        low: c?.difference.ci_low ?? null,
        high: c?.difference.ci_high ?? null,
        dots,
      };
    });
    const onlyOther = study.arms.length === 2 ? study.arms[1].label : "the other arm";
    const [left, right] = fmt.higherIsBetter ? [`← ${onlyOther} better`, `${reference} better →`] : [`← ${reference} better`, `${onlyOther} better →`];
    const plot = intervalPlot({
      id: "difference-plot",
      rows,
      band: margin !== null && margin !== undefined ? [-margin, margin] : null,
      zero: true,
      format: fmt.diffTick,
      axisLabel: `${reference} − other arm, in ${fmt.diffUnit}`,
      sides: [left, right],
    });
    const table = h(
      "table",
      { class: "jobs study-table", id: "difference-table" },
      h(
        "thead",
        {},
        h("tr", {}, [`${reference} minus`, "Mean", "Interval", "p-value", "Pairs", "Cost ratio", "Outcome"].map((t) => h("th", { scope: "col" }, t))),
      ),
      h(
        "tbody",
        {},
        study.arms.slice(1).map((arm, i) => {
          const c = comparisons.get(i + 1);
          const d = c?.difference;
          return h(
            "tr",
            { "data-arm": i + 1 },
            h("td", {}, arm.label),
            h("td", { class: "num diff-mean" }, d ? fmt.difference(d.mean) : "–"),
            h("td", { class: "num diff-ci" }, d && d.ci_low !== null ? `${fmt.difference(d.ci_low)} to ${fmt.difference(d.ci_high)}` : "–"),
            h("td", { class: "num diff-p" }, d && d.p_value !== null ? num(d.p_value, 3) : "–"),
            h("td", { class: "num diff-pairs" }, d ? String(d.n_pairs) : "0"),
            h("td", { class: "num diff-cost" }, c && c.cost_ratio !== null ? `${num(c.cost_ratio, 3)}×` : "–"),
            h("td", {}, c ? outcomeBadge(c) : "–", c?.seeds_needed ? h("span", { class: "muted small" }, ` ~${c.seeds_needed} seeds needed`) : null),
          );
        }),
      ),
    );
    const note = margin === null || margin === undefined
      ? "The margin band appears with the verdict (by default 0.5 accuracy points, or 2 % of the reference's loss)."
      : `Margin: ±${fmt.difference(margin).replace(/^[+−]/, "")}${verdict ? "" : " (from the spec)"}.`;
    replace(this.differenceBox, plot, h("p", { class: "muted small", id: "margin-note" }, note), table);
  }

  renderTrials() {
    const study = this.study;
    const fmt = metricFormat(study.spec.metric);
    const referenceBySeed = new Map(study.trials.filter((t) => t.arm === 0).map((t) => [t.seed, t.job_id]));
    replace(
      this.trialsBox,
      h(
        "table",
        { class: "jobs study-table" },
        h("thead", {}, h("tr", {}, ["Trial", "Arm", "Seed", "Status", `Best ${fmt.words}`, ""].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          { id: "trial-rows" },
          study.trials.map((trial) => {
            const result = this.results.get(trial.job_id);
            const pair = trial.arm !== 0 ? referenceBySeed.get(trial.seed) : null;
            return h(
              "tr",
              { "data-job-id": trial.job_id, "data-arm": trial.arm, "data-seed": trial.seed, "data-status": trial.status },
              h("td", {}, h("a", { class: "trial-link", href: `#/jobs/${encodeURIComponent(trial.job_id)}`, title: trial.job_id }, shortId(trial.job_id))),
              h("td", {}, h("i", { class: `arm-swatch arm-${trial.arm % ARM_COLORS.length}` }), this.labelOf(trial.arm)),
              h("td", { class: "num" }, String(trial.seed)),
              h("td", {}, statusBadge(trial.status)),
              h("td", { class: "num trial-best" }, result && Number.isFinite(result.best) ? fmt.value(result.best) : "–"),
              h(
                "td",
                {},
                pair
                  ? h("a", { class: "button small", href: `#/compare?a=${encodeURIComponent(pair)}&b=${encodeURIComponent(trial.job_id)}` }, "compare with the reference")
                  : null,
              ),
            );
          }),
        ),
      ),
    );
  }

  /** The local arm's trials (the first arm without synchronisation), or [] when every arm synchronises. */
  localTrials() {
    const local = this.study.arms.findIndex((_, arm) => !armSyncs(this.study, arm));
    return local < 0 ? [] : this.study.trials.filter((trial) => trial.arm === local);
  }

  renderLayersPanel() {
    const trials = this.localTrials();
    if (!trials.length) {
      replace(
        this.layersBox,
        h("p", { class: "muted" }, "Every arm synchronises BatchNorm: no arm shows the skew that synchronisation corrects."),
      );
      return;
    }
    this.trialSelect = h(
      "select",
      { id: "skew-trial", "aria-label": "local-arm trial", onchange: () => this.showHeatmap(this.trialSelect.value) },
      trials.map((trial) => h("option", { value: trial.job_id }, `seed ${trial.seed}`)),
    );
    const heatmapBox = h("div", { id: "study-heatmap" });
    this.layerList = h("div", { id: "verdict-layers" });
    this.heatmapLink = h("a", { id: "skew-trial-link" }, "open this trial's layer view");
    replace(
      this.layersBox,
      h(
        "p",
        { class: "help" },
        `${this.labelOf(trials[0].arm)} normalises each worker's batch with its own statistics. The share of a layer's `
          + "batch variance that comes from the workers' means differing (skew_between_share_mean) is what "
          + "synchronisation would remove: rows are layers in model order, columns recorded steps of one trial.",
      ),
      h("div", { class: "controls" }, h("label", { for: "skew-trial" }, "Trial "), this.trialSelect, this.heatmapLink),
      heatmapBox,
      this.layerList,
    );
    this.heatmap = new Heatmap(heatmapBox, {
      rowButtons: true,
      rowLabel: "layer",
      columnLabel: "step",
      onSelect: (row, column) => this.heatmap.select(row, column),
    });
    this.renderLayerList();
  }

  /** The verdict's ranking of the local arm's layers (pooled over its trials and recorded steps). */
  renderLayerList() {
    if (!this.layerList) return;
    const layers = this.study.verdict?.layers || [];
    if (!layers.length) {
      replace(this.layerList, h("p", { class: "muted small" }, "The verdict's ranking of the layers appears with the verdict."));
      return;
    }
    replace(
      this.layerList,
      h("h3", {}, "Layers whose workers disagreed most (the verdict's ranking, over every local-arm trial)"),
      h(
        "table",
        { class: "diff" },
        h("thead", {}, h("tr", {}, h("th", {}, "layer"), h("th", {}, "mean between-rank share"), h("th", {}, "points"))),
        h(
          "tbody",
          {},
          layers.map((layer) =>
            h(
              "tr",
              { "data-layer": layer.layer },
              h("td", {}, h("code", {}, layer.layer)),
              h("td", { class: "num layer-share" }, num(layer.between_share_mean, 4)),
              h("td", { class: "num" }, String(layer.points)),
            ),
          ),
        ),
      ),
    );
  }

  /** Show the first succeeded local-arm trial (else the first one), unless one is shown already. */
  chooseHeatmapTrial() {
    if (!this.trialSelect) return;
    const trials = this.localTrials();
    const shown = trials.find((t) => t.job_id === this.heatmapTrial);
    if (shown && (shown.status === "succeeded" || !trials.some((t) => t.status === "succeeded"))) return;
    const pick = trials.find((t) => t.status === "succeeded") || trials[0];
    this.trialSelect.value = pick.job_id;
    this.showHeatmap(pick.job_id);
  }

  async showHeatmap(jobId) {
    this.heatmapTrial = jobId;
    this.heatmapLink.setAttribute("href", `#/jobs/${encodeURIComponent(jobId)}`);
    this.heatmap.container.dataset.job = jobId;
    this.heatmap.setStatus("Loading the trial's layer statistics…", "loading");
    try {
      const matrix = await this.ctx.api.get(`v1/jobs/${encodeURIComponent(jobId)}/layer-summaries`, {
        keys: SKEW_KEY,
        max_steps: HEATMAP_STEPS,
      });
      if (this.stopped || this.heatmapTrial !== jobId) return; // another trial was chosen meanwhile
      this.heatmap.setStatus(null);
      this.heatmap.setData(matrix.layers, matrix.steps, matrix.values[SKEW_KEY] || []);
    } catch (error) {
      if (this.heatmapTrial === jobId) this.heatmap.setStatus(`Could not read the trial's layer statistics: ${error.message}`, "error");
    }
  }

  /** Read a trial's metrics: all of them, or (while it runs) the points after those already here. */
  async readMetrics(trial, { onlyNew = false } = {}) {
    const known = this.results.get(trial.job_id);
    const since = onlyNew && known?.steps.step.length ? known.steps.step[known.steps.step.length - 1] : null;
    let answer;
    try {
      answer = await this.ctx.api.get(`v1/jobs/${encodeURIComponent(trial.job_id)}/metrics`, { since_step: since });
    } catch (error) {
      if (error.status !== 404) console.warn("could not read a trial's metrics", error.message);
      return;
    }
    if (this.stopped) return;
    let result;
    if (since === null || !known) {
      result = { steps: stepColumns(answer.steps), epochs: answer.epochs };
    } else {
      const steps = stepColumns(answer.steps.filter((p) => p.step > since));
      for (const key of Object.keys(known.steps)) known.steps[key].push(...steps[key]);
      const epochs = new Map(known.epochs.map((e) => [e.epoch, e]));
      for (const point of answer.epochs) epochs.set(point.epoch, point);
      result = { steps: known.steps, epochs: [...epochs.values()].sort((a, b) => a.epoch - b.epoch) };
    }
    result.final = isTerminal(trial.status);
    result.best = this.bestOf(result.epochs);
    this.results.set(trial.job_id, result);
  }

  /** A trial's best value of the study's metric over its epochs (what the verdict takes per trial). */
  bestOf(epochs) {
    const accuracy = this.study.spec.metric === "val_accuracy";
    const values = epochs.map((e) => (accuracy ? e.val_acc : e.val_loss)).filter((v) => typeof v === "number" && Number.isFinite(v));
    if (!values.length) return null;
    return accuracy ? Math.max(...values) : Math.min(...values);
  }

  async poll() {
    if (this.polling || document.hidden) return;
    const running = this.study.trials.filter((t) => t.status === "running");
    if (!running.length) return;
    this.polling = true;
    try {
      await Promise.all(running.map((trial) => this.readMetrics(trial, { onlyNew: true })));
      this.scheduleResults();
    } finally {
      this.polling = false;
    }
  }

  onEvent({ type, data }) {
    if (!data || typeof data !== "object") return;
    if (type === "study" && data.id === this.studyId) {
      this.study = data;
      this.renderHead();
      this.renderVerdict();
      this.renderLayerList();
      this.refreshEnded();
      this.scheduleResults();
    } else if (type === "trial") {
      const trial = this.study.trials.find((t) => t.job_id === data.job_id);
      if (!trial || trial.status === data.status) return;
      trial.status = data.status;
      this.renderHead();
      this.refreshEnded();
      this.scheduleResults();
    }
  }

  /** Re-read the metrics of trials that ended since their last read (their final points), and the heatmap. */
  async refreshEnded() {
    const ended = this.study.trials.filter((t) => isTerminal(t.status) && !this.results.get(t.job_id)?.final);
    if (!ended.length) return;
    await Promise.all(ended.map((trial) => this.readMetrics(trial)));
    this.scheduleResults();
    if (ended.some((t) => t.job_id === this.heatmapTrial)) this.showHeatmap(this.heatmapTrial);
    else this.chooseHeatmapTrial();
  }

  async cancel(button) {
    if (!window.confirm("Cancel this study? Its queued and running trials are cancelled; finished ones keep their results.")) return;
    button.disabled = true;
    try {
      this.study = await this.ctx.api.del(this.path);
      this.ctx.flash(`Study ${this.study.name || shortId(this.study.id)} cancelled.`);
      this.renderStudy();
      this.refreshEnded();
    } catch (error) {
      button.disabled = false;
      this.ctx.flash(`Could not cancel the study: ${error.message}`, "error");
    }
  }

  unmount() {
    this.stopped = true;
    this.stream?.stop();
    clearInterval(this.poller);
    clearTimeout(this.renderTimer);
    this.curves?.destroy();
    this.heatmap?.destroy();
  }
}
