// Everything the dashboard knows about one job, kept current from the job's event stream.
//
// The stream replays a job's whole history from its first event and then goes live, so one code path serves
// finished and running jobs alike. The per-layer summaries of the past are the exception: they are read first, as
// a layers x steps matrix of the statistic on screen only (GET /layer-summaries?keys=<that one>), and the stream
// leaves out the `layers` events of those steps (hundreds of layers x steps would otherwise replay as megabytes of
// events). `layers` events arriving later carry every summary. When the page shows another statistic,
// `loadStatistic` reads that one key for the history already read (once: a key read stays loaded) and merges it by
// step; until then `statisticState` says "loading" (or "error"), so the heatmap never draws a blank map as if it
// were the data. Listeners are told what changed ("job", "steps", "epochs", "layers", "logs", "stream"), at most
// every 150 ms, so a burst of events redraws the charts once.

import { isTerminal } from "./dom.js";
import { STATISTICS } from "./layer_view.js";

const NOTIFY_EVERY_MS = 150;
const MAX_LOG_LINES = 2000;

export class JobFeed {
  constructor(api, jobId) {
    this.api = api;
    this.jobId = jobId;
    this.path = `v1/jobs/${encodeURIComponent(jobId)}`;
    this.job = null;
    this.steps = { step: [], epoch: [], train_loss: [], lr: [], samples_per_s: [], step_time_s: [] };
    this.epochs = []; // epoch points, in epoch order
    this.layerSteps = []; // recorded steps, ascending
    this.layerEpochs = [];
    this.layerNames = []; // in the order they first appeared (the model's order)
    this.layerStats = new Map(); // layer -> array aligned with layerSteps of summary dicts (or null)
    // The history read by GET /layer-summaries: its steps go up to historyThrough (null: no such read, every
    // summary came with the `layers` events) and hold only the statistics in historyKeys.
    this.historyThrough = null;
    this.historyKeys = new Set();
    this.statisticReads = new Map(); // statistic -> the promise of its read in flight
    this.statisticErrors = new Map(); // statistic -> why its last read failed
    this.logs = [];
    this.streamState = "idle";
    this.streamDetail = "";
    this.listeners = new Set();
    this.changed = new Set();
    this.timer = null;
    this.stream = null;
    this.stopped = false;
  }

  /**
   * Read the job and the history of the statistic `statistic` (the one the page shows first), then follow its
   * events. Rejects with the ApiError of the first read (e.g. 404).
   */
  async start(statistic = STATISTICS[0].key) {
    const path = this.path;
    this.job = await this.api.get(path);
    this.notify("job");
    const through = await this.loadLayerSummaries(statistic);
    const query = through === null ? "" : `?layers_after_step=${through}`;
    this.stream = this.api.follow(`${path}/events${query}`, {
      onEvent: (event) => this.onEvent(event),
      onState: (state, detail) => {
        this.streamState = state;
        this.streamDetail = detail || "";
        this.notify("stream");
      },
      reconnect: () => !isTerminal(this.job?.status),
    });
    return this;
  }

  /**
   * Read one statistic of every layer at every recorded step (the history); returns the last step read (null:
   * none recorded yet, or the read failed: then the event stream replays every summary instead).
   */
  async loadLayerSummaries(statistic) {
    let matrix;
    try {
      matrix = await this.api.get(`${this.path}/layer-summaries`, { keys: statistic });
    } catch (error) {
      console.warn("could not read the layer summaries; the event stream replays them", error.message);
      return null;
    }
    if (!matrix.steps.length) return null;
    this.layerSteps = matrix.steps.slice();
    this.layerEpochs = matrix.epochs.slice();
    this.layerNames = matrix.layers.slice();
    for (const name of matrix.layers) this.layerStats.set(name, matrix.steps.map(() => ({})));
    this.historyThrough = matrix.steps[matrix.steps.length - 1];
    this.mergeStatistic(statistic, matrix);
    this.notify("layers");
    return this.historyThrough;
  }

  /**
   * "ready" when the history of `statistic` is here, "loading" while it is read, "error" when that failed,
   * "missing" when nobody asked for it yet (see loadStatistic).
   */
  statisticState(statistic) {
    if (this.historyThrough === null || this.historyKeys.has(statistic)) return "ready";
    if (this.statisticReads.has(statistic)) return "loading";
    return this.statisticErrors.has(statistic) ? "error" : "missing";
  }

  /** Why the last read of `statistic` failed ("" if it did not). */
  statisticError(statistic) {
    return this.statisticErrors.get(statistic) || "";
  }

  /**
   * Make sure the history holds `statistic`: read it (one key) unless it is here or already being read, merge it
   * by step and notify "layers" (also when the read fails: statisticState then says "error"; calling this again
   * retries). Resolves when done; never rejects.
   */
  loadStatistic(statistic) {
    if (this.statisticState(statistic) === "ready") return Promise.resolve();
    if (this.statisticReads.has(statistic)) return this.statisticReads.get(statistic);
    this.statisticErrors.delete(statistic);
    const read = this.api
      .get(`${this.path}/layer-summaries`, { keys: statistic })
      .then((matrix) => this.mergeStatistic(statistic, matrix))
      .catch((error) => this.statisticErrors.set(statistic, error.message))
      .finally(() => {
        this.statisticReads.delete(statistic);
        this.notify("layers");
      });
    this.statisticReads.set(statistic, read);
    return read;
  }

  /**
   * Put the values of `statistic` from a /layer-summaries answer into the summaries of the history's steps (by
   * step: the answer may hold steps recorded since, whose `layers` events brought every statistic already). Past
   * the server's max_steps (2000 recorded steps) both answers are downsampled; while a job runs they may pick
   * different steps, and a history step the later answer lacks keeps no value for `statistic`.
   */
  mergeStatistic(statistic, matrix) {
    const columnOf = new Map(this.layerSteps.map((step, column) => [step, column]));
    const rows = matrix.values[statistic];
    matrix.layers.forEach((name, row) => {
      const stats = this.layerStats.get(name);
      if (!stats) return; // first recorded after the history: its `layers` events bring every statistic
      matrix.steps.forEach((step, column) => {
        const at = columnOf.get(step);
        if (at === undefined || step > this.historyThrough) return;
        if (!stats[at]) stats[at] = {};
        stats[at][statistic] = rows[row][column];
      });
    });
    this.historyKeys.add(statistic);
  }

  stop() {
    this.stopped = true;
    this.stream?.stop();
    clearTimeout(this.timer);
    this.listeners.clear();
  }

  /** Call `listener(changedKinds: Set)` after changes; returns a function that removes it. */
  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  notify(kind) {
    if (this.stopped) return; // a read that ends after the page went away
    this.changed.add(kind);
    if (this.timer !== null) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      const changed = this.changed;
      this.changed = new Set();
      for (const listener of this.listeners) {
        try {
          listener(changed);
        } catch (error) {
          console.error("dashboard listener failed", error);
        }
      }
    }, NOTIFY_EVERY_MS);
  }

  onEvent({ type, data }) {
    if (!data || typeof data !== "object") return;
    if (type === "status") this.onStatus(data);
    else if (type === "step") this.onStep(data);
    else if (type === "epoch") this.onEpoch(data);
    else if (type === "layers") this.onLayers(data);
    else if (type === "log") this.onLog(data);
  }

  onStatus(data) {
    const job = this.job;
    job.status = data.status;
    if (data.error !== undefined) job.error = data.error;
    if (data.status === "running" && !job.started_at) job.started_at = data.at;
    if (isTerminal(data.status)) job.finished_at = job.finished_at || data.at;
    const summary = job.summary;
    const keys = ["epochs_done", "last_val_acc", "best_val_acc", "final_val_acc", "final_val_acc_precise", "final_train_loss", "verdict", "warning"];
    for (const key of keys) {
      if (data[key] !== undefined && data[key] !== null) summary[key] = data[key];
    }
    this.notify("job");
    if (isTerminal(data.status)) this.refreshJob();
  }

  /** Re-read the job once it ended: the final fields (has_model, finished_at) come from the job resource. */
  async refreshJob() {
    try {
      this.job = await this.api.get(`v1/jobs/${encodeURIComponent(this.jobId)}`);
      this.notify("job");
    } catch (error) {
      if (error.status !== 404) console.warn("could not re-read the job", error.message);
    }
  }

  onStep(point) {
    const steps = this.steps;
    const last = steps.step.length ? steps.step[steps.step.length - 1] : -Infinity;
    if (point.step <= last) return; // a replay after a resumed run: keep the first copy
    for (const key of Object.keys(steps)) steps[key].push(point[key] ?? null);
    if (this.job) this.job.summary.last_step = point.step;
    this.notify("steps");
  }

  onEpoch(point) {
    const at = this.epochs.findIndex((p) => p.epoch === point.epoch);
    if (at >= 0) this.epochs[at] = point;
    else {
      this.epochs.push(point);
      this.epochs.sort((a, b) => a.epoch - b.epoch);
    }
    const summary = this.job?.summary;
    if (summary) {
      summary.epochs_done = Math.max(summary.epochs_done || 0, point.epoch);
      summary.last_val_acc = point.val_acc;
      if (point.val_acc !== null && (summary.best_val_acc === null || point.val_acc > summary.best_val_acc)) {
        summary.best_val_acc = point.val_acc;
      }
    }
    this.notify("epochs");
    this.notify("job");
  }

  onLayers(record) {
    if (this.layerSteps.length && record.step <= this.layerSteps[this.layerSteps.length - 1]) return;
    this.layerSteps.push(record.step);
    this.layerEpochs.push(record.epoch);
    const index = this.layerSteps.length - 1;
    for (const [name, stats] of Object.entries(record.layers || {})) {
      if (!this.layerStats.has(name)) {
        this.layerNames.push(name);
        this.layerStats.set(name, []);
      }
      this.layerStats.get(name)[index] = stats;
    }
    for (const values of this.layerStats.values()) values.length = this.layerSteps.length;
    this.notify("layers");
  }

  onLog(line) {
    this.logs.push(line);
    if (this.logs.length > MAX_LOG_LINES) this.logs.splice(0, this.logs.length - MAX_LOG_LINES);
    this.notify("logs");
  }

  /** Values of one summary statistic: one array per layer (layerNames order), aligned with layerSteps. */
  layerMatrix(statistic) {
    return this.layerNames.map((name) => {
      const values = this.layerStats.get(name);
      return Array.from({ length: this.layerSteps.length }, (_, i) => {
        const value = values[i]?.[statistic];
        return typeof value === "number" && Number.isFinite(value) ? value : null;
      });
    });
  }

  /** Steps per epoch as far as it is known (the first epoch's last step, or the spec's cap), else null. */
  stepsPerEpoch() {
    if (this.epochs.length) {
      const first = this.epochs[0];
      if (first.step > 0 && first.epoch > 0) return first.step / first.epoch;
    }
    return this.job?.spec?.steps_per_epoch ?? null;
  }
}
