// Line and bar charts on top of the vendored uPlot (global `uPlot`, loaded by index.html before this module).
//
// uPlot wants "aligned" data: one shared, sorted x array and one y array per series, with null where a series
// has no point. `align()` builds that from separate (x, y) series, so step points and the sparser epoch points
// can share one chart; `spanGaps` draws each series as a connected line through its own points.

import { h, num } from "./dom.js";

/** Colours of the charts' series, chosen to stay apart for colour-blind readers (Okabe–Ito). */
export const PALETTE = {
  blue: "#0072b2",
  orange: "#e69f00",
  green: "#009e73",
  red: "#d55e00",
  purple: "#cc79a7",
  sky: "#56b4e9",
  grey: "#666666",
};

/**
 * Merge series given as {x: [...], y: [...]} into uPlot's aligned form [xs, ys1, ys2, ...].
 * Points with a null/non-finite y are dropped; x values are sorted and shared.
 */
export function align(seriesList) {
  const xs = new Set();
  const maps = seriesList.map(({ x, y }) => {
    const map = new Map();
    for (let i = 0; i < x.length; i++) {
      if (x[i] === null || x[i] === undefined || !Number.isFinite(y[i])) continue;
      map.set(x[i], y[i]);
      xs.add(x[i]);
    }
    return map;
  });
  const sorted = [...xs].sort((a, b) => a - b);
  return [sorted, ...maps.map((map) => sorted.map((x) => (map.has(x) ? map.get(x) : null)))];
}

/** Tick spacings of the x axes: whole steps, epochs and channel indices, never 0.5. */
const WHOLE_NUMBER_TICKS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10_000, 20_000, 50_000, 100_000];

function axisValues(_, values) {
  return values.map((v) => num(v, 3));
}

/**
 * A chart with a title, a legend and an empty-state note, resized with its container.
 * The container gets data-points (number of x values shown) so tests and people can see it fill up.
 */
export class Chart {
  /**
   * @param {HTMLElement} container  the element to draw into (its content is replaced)
   * @param {object} options  title, xLabel, yLabel, height, yRange ([min, max], uPlot's range function, or null),
   *   bars (first series as bars),
   *   series: [{label, color, dash ([on, off] or null), points (draw markers), pointsOnly (markers, no line), width}]
   */
  constructor(container, options) {
    this.container = container;
    this.options = options;
    this.emptyNote = h("p", { class: "chart-empty muted" }, options.empty || "No points yet.");
    this.plotBox = h("div", { class: "chart-plot" });
    container.replaceChildren(h("h3", { class: "chart-title" }, options.title), this.plotBox, this.emptyNote);
    container.classList.add("chart");
    container.dataset.points = "0";
    this.plot = null;
    this.data = [[], ...options.series.map(() => [])];
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(container);
  }

  uplotOptions(width) {
    const { xLabel, yLabel, yRange, series, height = 220, bars = false } = this.options;
    return {
      width,
      height,
      scales: {
        x: { time: false },
        y: yRange ? { range: yRange } : {},
      },
      axes: [
        { label: xLabel, values: axisValues, incrs: WHOLE_NUMBER_TICKS, grid: { stroke: "#eeeeee" } },
        { label: yLabel, values: axisValues, size: 64, grid: { stroke: "#eeeeee" } },
      ],
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
      series: [
        { label: xLabel, value: (_, v) => (v === null ? "–" : num(v, 5)) },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color,
          fill: bars && i === 0 ? `${s.color}66` : undefined,
          width: s.width ?? 2,
          dash: s.dash || undefined,
          spanGaps: true,
          paths: bars && i === 0 ? uPlot.paths.bars({ size: [0.7, 40] }) : s.pointsOnly ? () => null : undefined,
          points: { show: s.points || s.pointsOnly || false, size: 6, stroke: s.color, fill: s.color },
          value: (_, v) => (v === null ? "–" : num(v, 5)),
        })),
      ],
    };
  }

  /** Replace the data: aligned arrays [xs, ys...] (see align()). */
  setData(data) {
    this.data = data;
    const count = data[0].length;
    this.container.dataset.points = String(count);
    this.emptyNote.hidden = count > 0;
    if (!this.plot) {
      const width = this.plotWidth();
      if (width <= 0) return; // not laid out yet: resize() draws it
      this.plot = new uPlot(this.uplotOptions(width), data, this.plotBox);
    } else {
      this.plot.setData(data);
    }
  }

  plotWidth() {
    return Math.floor(this.plotBox.clientWidth);
  }

  resize() {
    const width = this.plotWidth();
    if (width <= 0) return;
    if (!this.plot) {
      this.setData(this.data);
    } else if (Math.abs(this.plot.width - width) > 1) {
      this.plot.setSize({ width, height: this.options.height ?? 220 });
    }
  }

  destroy() {
    this.resizer.disconnect();
    this.plot?.destroy();
    this.plot = null;
  }
}
