// A "forest plot" in SVG: one row per item, its confidence interval as a whisker, its mean as a diamond and its
// single observations (one per seed) as dots, on one shared horizontal axis; optionally a shaded band (the margin
// within which a difference is too small to matter) and a line at zero.
//
// The study page draws the arms' metric with it, and the paired differences against the margin band. Every mark
// carries its value in data-value (data-low/data-high for intervals and the band), and the SVG its scale in
// data-domain-low/-high and data-x0/-x1 (the plot's left and right edge, in the viewBox's units), so a reader, or
// a test, can check that a mark stands where its number says.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 760;
const LABEL_WIDTH = 190;
const RIGHT_PAD = 24;
const ROW_HEIGHT = 38;
const TOP = 10;
const AXIS_HEIGHT = 34;

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

/** About `count` round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten). */
export function niceTicks(low, high, count = 5) {
  const span = high - low;
  if (!(span > 0)) return [low];
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || 10 * power;
  const ticks = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return ticks;
}

function finite(value) {
  return typeof value === "number" && Number.isFinite(value);
}

/**
 * Build the plot.
 * @param {object} options
 *   rows: [{label, color, mean, low, high, dots: [{value, title}], title}] (null values are not drawn);
 *   band: [low, high] or null; zero: draw a line at 0; format(value) -> text for ticks and titles;
 *   axisLabel: text under the axis; sides: [left text, right text] written at the axis' ends (e.g. which arm is
 *   better on that side); id: the SVG's id.
 */
export function intervalPlot({ rows, band = null, zero = false, format = String, axisLabel = "", sides = null, id }) {
  const values = [];
  for (const row of rows) {
    for (const v of [row.mean, row.low, row.high, ...(row.dots || []).map((d) => d.value)]) if (finite(v)) values.push(v);
  }
  if (band) values.push(...band);
  if (zero) values.push(0);
  let low = values.length ? Math.min(...values) : 0;
  let high = values.length ? Math.max(...values) : 1;
  if (high - low < 1e-12) {
    const pad = Math.abs(high) * 0.1 || 0.01;
    low -= pad;
    high += pad;
  }
  const pad = (high - low) * 0.08;
  low -= pad;
  high += pad;
  const x0 = LABEL_WIDTH;
  const x1 = WIDTH - RIGHT_PAD;
  const x = (v) => x0 + ((v - low) / (high - low)) * (x1 - x0);
  const plotBottom = TOP + rows.length * ROW_HEIGHT;
  const height = plotBottom + AXIS_HEIGHT + (sides ? 16 : 0);
  const root = svg("svg", {
    id,
    class: "interval-plot",
    viewBox: `0 0 ${WIDTH} ${height}`,
    role: "img",
    "data-domain-low": low,
    "data-domain-high": high,
    "data-x0": x0,
    "data-x1": x1,
  });
  root.append(svg("title", {}, rows.map((row) => row.title || row.label).join("; ")));

  if (band) {
    const [a, b] = band;
    root.append(
      svg(
        "rect",
        { class: "band", x: x(a), y: TOP, width: Math.max(0, x(b) - x(a)), height: plotBottom - TOP, fill: "#e8ebf0", "data-low": a, "data-high": b },
        svg("title", {}, `too small to matter: ${format(a)} to ${format(b)}`),
      ),
    );
  }
  const ticks = niceTicks(low, high);
  for (const tick of ticks) {
    root.append(
      svg("line", { class: "grid", x1: x(tick), x2: x(tick), y1: TOP, y2: plotBottom, stroke: "#f0f0f0" }),
      svg("text", { class: "tick", x: x(tick), y: plotBottom + 14, "text-anchor": "middle", "font-size": 11, fill: "#5f6878" }, format(tick)),
    );
  }
  root.append(svg("line", { class: "axis", x1: x0, x2: x1, y1: plotBottom, y2: plotBottom, stroke: "#9aa3b2" }));
  if (zero) {
    root.append(svg("line", { class: "zero", x1: x(0), x2: x(0), y1: TOP - 4, y2: plotBottom, stroke: "#1d2330", "stroke-dasharray": "3 3", "data-value": 0 }));
  }
  if (axisLabel) {
    root.append(svg("text", { x: (x0 + x1) / 2, y: plotBottom + 29, "text-anchor": "middle", "font-size": 11, fill: "#5f6878" }, axisLabel));
  }
  if (sides) {
    const y = plotBottom + 44;
    root.append(
      svg("text", { class: "side-left", x: x0, y, "font-size": 11, fill: "#5f6878" }, sides[0]),
      svg("text", { class: "side-right", x: x1, y, "text-anchor": "end", "font-size": 11, fill: "#5f6878" }, sides[1]),
    );
  }

  rows.forEach((row, index) => {
    const y = TOP + index * ROW_HEIGHT + ROW_HEIGHT / 2;
    const group = svg("g", { class: "row", "data-row": index });
    group.append(svg("text", { class: "row-label", x: x0 - 10, y: y + 4, "text-anchor": "end", "font-size": 12, fill: "#1d2330" }, row.label));
    if (finite(row.low) && finite(row.high)) {
      group.append(
        svg(
          "line",
          { class: "ci", x1: x(row.low), x2: x(row.high), y1: y, y2: y, stroke: row.color, "stroke-width": 2.5, "data-low": row.low, "data-high": row.high },
          svg("title", {}, `interval ${format(row.low)} to ${format(row.high)}`),
        ),
        svg("line", { x1: x(row.low), x2: x(row.low), y1: y - 7, y2: y + 7, stroke: row.color, "stroke-width": 2 }),
        svg("line", { x1: x(row.high), x2: x(row.high), y1: y - 7, y2: y + 7, stroke: row.color, "stroke-width": 2 }),
      );
    }
    for (const dot of row.dots || []) {
      if (!finite(dot.value)) continue;
      group.append(
        svg(
          "circle",
          { class: "dot", cx: x(dot.value), cy: y - 11, r: 3.5, fill: "#ffffff", stroke: row.color, "stroke-width": 1.5, "data-value": dot.value },
          svg("title", {}, dot.title || format(dot.value)),
        ),
      );
    }
    if (finite(row.mean)) {
      const cx = x(row.mean);
      group.append(
        svg(
          "path",
          { class: "mean", d: `M${cx} ${y - 6}L${cx + 6} ${y}L${cx} ${y + 6}L${cx - 6} ${y}Z`, fill: row.color, "data-value": row.mean, "data-x": cx },
          svg("title", {}, `mean ${format(row.mean)}`),
        ),
      );
    }
    root.append(group);
  });
  return root;
}
