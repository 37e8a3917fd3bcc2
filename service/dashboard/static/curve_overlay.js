// Several runs' curves overlaid on one set of charts: train loss and throughput against step, validation loss and
// accuracy against epoch. The compare page draws two jobs with it, the study page every trial of a study.
//
// Each run is a series with its own label, colour and dash; its data is what a JobFeed holds (`steps`: columns
// step, train_loss, samples_per_s; `epochs`: points with epoch, val_loss, val_acc, train_acc), so a live feed and
// a one-off read of GET /v1/jobs/{id}/metrics draw alike.

import { align, Chart } from "./charts.js";
import { h } from "./dom.js";

/** Step columns of a GET /v1/jobs/{id}/metrics answer, in the JobFeed's shape (one array per field). */
export function stepColumns(points) {
  const columns = { step: [], train_loss: [], samples_per_s: [] };
  for (const point of points) for (const key of Object.keys(columns)) columns[key].push(point[key] ?? null);
  return columns;
}

export class CurveOverlay {
  /**
   * @param {HTMLElement} container  gets the four charts (ids `${idPrefix}-loss`, `-val-loss`, `-accuracy`,
   *   `-throughput`)
   * @param {object} options  idPrefix; runs: [{label, color, dash}]; trainAccuracy: also draw each run's training
   *   accuracy (dashed), next to its validation accuracy
   */
  constructor(container, { idPrefix, runs, trainAccuracy = false }) {
    this.runs = runs;
    this.trainAccuracy = trainAccuracy;
    const boxes = {
      loss: h("div", { id: `${idPrefix}-loss` }),
      valLoss: h("div", { id: `${idPrefix}-val-loss` }),
      accuracy: h("div", { id: `${idPrefix}-accuracy` }),
      throughput: h("div", { id: `${idPrefix}-throughput` }),
    };
    container.replaceChildren(...Object.values(boxes));
    const series = (kind, extra = {}) =>
      runs.map((run) => ({ label: `${run.label} ${kind}`, color: run.color, dash: run.dash || null, ...extra }));
    const accuracy = series("validation", { points: true });
    if (trainAccuracy) accuracy.push(...series("train", { points: true, dash: [4, 3] }));
    this.charts = {
      loss: new Chart(boxes.loss, { title: "Train loss", xLabel: "step", yLabel: "loss", series: series("train", { width: 1.5 }) }),
      valLoss: new Chart(boxes.valLoss, {
        title: "Validation loss",
        xLabel: "epoch",
        yLabel: "loss",
        series: series("validation", { points: true }),
      }),
      accuracy: new Chart(boxes.accuracy, { title: "Accuracy", xLabel: "epoch", yLabel: "accuracy", yRange: [0, 1], series: accuracy }),
      throughput: new Chart(boxes.throughput, {
        title: "Throughput",
        xLabel: "step",
        yLabel: "samples/s",
        series: series("samples/s", { width: 1.5 }),
      }),
    };
  }

  /** Redraw from `sources` (one per run, in the runs' order): {steps, epochs} as described above. */
  update(sources) {
    const byStep = (key) => sources.map((source) => ({ x: source.steps.step, y: source.steps[key] }));
    const byEpoch = (key) => sources.map((source) => ({ x: source.epochs.map((e) => e.epoch), y: source.epochs.map((e) => e[key]) }));
    this.charts.loss.setData(align(byStep("train_loss")));
    this.charts.valLoss.setData(align(byEpoch("val_loss")));
    this.charts.accuracy.setData(align(this.trainAccuracy ? [...byEpoch("val_acc"), ...byEpoch("train_acc")] : byEpoch("val_acc")));
    this.charts.throughput.setData(align(byStep("samples_per_s")));
  }

  destroy() {
    for (const chart of Object.values(this.charts)) chart.destroy();
  }
}
