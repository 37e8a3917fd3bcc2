// A rows x columns heatmap on a canvas: BatchNorm layers x recorded steps, or channels x recorded steps.
//
// Rows can carry their names as buttons beside the canvas (for layers: click to open the layer), or stay
// unlabelled (hundreds of channels). Hovering a cell shows its row, column and value; clicking a cell calls
// onSelect(row, column). The colour scale spans the finite values shown (optionally on a log scale). While its
// values are being read (or could not be), `setStatus` shows a sentence over a blank plot instead of the cells.

import { h, num, replace } from "./dom.js";

// Viridis, sampled at 9 evenly spaced points (perceptually uniform, readable in grey and by colour-blind readers).
const VIRIDIS = [
  [68, 1, 84],
  [71, 44, 122],
  [59, 81, 139],
  [44, 113, 142],
  [33, 144, 141],
  [39, 173, 129],
  [92, 200, 99],
  [170, 220, 50],
  [253, 231, 37],
];
const MISSING = "#e6e6e6";
const AXIS_HEIGHT = 22;

/** The colour of t in [0, 1] on the viridis scale. */
export function colorAt(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const [a, b] = [VIRIDIS[i], VIRIDIS[i + 1]];
  return `rgb(${a.map((c, k) => Math.round(c + (b[k] - c) * f)).join(",")})`;
}

export class Heatmap {
  /**
   * @param {HTMLElement} container
   * @param {object} options  rowButtons (bool), rowLabel ("layer"), columnLabel ("step"), rowHeight (px),
   *   maxHeight (px, for many rows), onSelect(row, column), format(value) -> text
   */
  constructor(container, options = {}) {
    this.options = { rowLabel: "row", columnLabel: "step", rowHeight: 22, maxHeight: 420, ...options };
    this.container = container;
    this.rows = [];
    this.columns = [];
    this.values = [];
    this.selectedRow = -1;
    this.selectedColumn = -1;
    this.logScale = false;
    this.fixedRange = null;
    this.status = null; // {text, state}: a sentence shown instead of the cells

    this.canvas = h("canvas", { class: "heatmap-canvas", role: "img", "aria-label": "heatmap" });
    this.tooltip = h("div", { class: "heatmap-tooltip", role: "tooltip", hidden: true });
    this.statusLine = h("p", { class: "heatmap-status", role: "status", hidden: true });
    this.rowList = h("div", { class: "heatmap-rows" });
    this.legend = h("div", { class: "heatmap-legend" });
    this.canvasBox = h("div", { class: "heatmap-canvas-box" }, this.canvas, this.statusLine, this.tooltip);
    const body = h("div", { class: "heatmap-body" }, this.options.rowButtons ? this.rowList : null, this.canvasBox);
    container.replaceChildren(body, this.legend);
    container.classList.add("heatmap");
    container.dataset.state = "ready";

    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => {
      this.tooltip.hidden = true;
    });
    this.canvas.addEventListener("click", (e) => {
      const cell = this.cellAt(e);
      if (cell) this.options.onSelect?.(cell.row, cell.column);
    });
    this.resizer = new ResizeObserver(() => this.draw());
    this.resizer.observe(this.canvasBox);
  }

  /** rows: names; columns: labels (steps); values[row][column]: number or null. */
  setData(rows, columns, values) {
    const rowsChanged = rows.length !== this.rows.length || rows.some((r, i) => r !== this.rows[i]);
    this.rows = [...rows]; // copies: callers keep appending to their own arrays
    this.columns = [...columns];
    this.values = values;
    this.container.dataset.rows = String(rows.length);
    this.container.dataset.columns = String(columns.length);
    if (rowsChanged && this.options.rowButtons) this.renderRowButtons();
    this.draw();
  }

  /**
   * Show `text` over a blank plot instead of the cells: state "loading" while the values are read, "error" when
   * they could not be. `setStatus(null)` draws the values again. The container's data-state says which.
   */
  setStatus(text, state = "loading") {
    this.status = text ? { text, state } : null;
    this.container.dataset.state = text ? state : "ready";
    this.statusLine.textContent = text || "";
    this.statusLine.hidden = !text;
    this.statusLine.classList.toggle("error-text", Boolean(text) && state === "error");
    if (text) this.tooltip.hidden = true;
    this.draw();
  }

  setLogScale(on) {
    this.logScale = on;
    this.draw();
  }

  select(row, column = this.selectedColumn) {
    this.selectedRow = row;
    this.selectedColumn = column;
    for (const [i, button] of [...this.rowList.children].entries()) {
      button.classList.toggle("selected", i === row);
      button.setAttribute("aria-pressed", String(i === row));
    }
    this.draw();
  }

  rowHeight() {
    const { rowHeight, maxHeight } = this.options;
    if (this.rows.length * rowHeight <= maxHeight) return rowHeight;
    return Math.max(0.5, maxHeight / Math.max(1, this.rows.length));
  }

  renderRowButtons() {
    const height = `${this.rowHeight()}px`;
    replace(
      this.rowList,
      this.rows.map((name, i) => {
        const button = h(
          "button",
          {
            type: "button",
            class: "heatmap-row",
            title: name,
            "data-row": name,
            "aria-pressed": String(i === this.selectedRow),
            onclick: () => this.options.onSelect?.(i, this.selectedColumn >= 0 ? this.selectedColumn : -1),
          },
          name,
        );
        button.style.height = height;
        return button;
      }),
    );
    this.rowList.style.paddingBottom = `${AXIS_HEIGHT}px`;
  }

  /** Use [low, high] as the colour scale (e.g. shared by two heatmaps side by side); null: span the values. */
  setFixedRange(range) {
    this.fixedRange = range;
    this.draw();
  }

  /** The scale: [low, high] over the finite values (positive ones on a log scale), or null if none. */
  range() {
    if (this.fixedRange && !this.logScale) return this.fixedRange;
    let low = Infinity;
    let high = -Infinity;
    for (const row of this.values) {
      for (const v of row) {
        if (v === null || !Number.isFinite(v) || (this.logScale && v <= 0)) continue;
        const x = this.logScale ? Math.log10(v) : v;
        if (x < low) low = x;
        if (x > high) high = x;
      }
    }
    return low === Infinity ? null : [low, high];
  }

  position(value, range) {
    if (value === null || !Number.isFinite(value) || !range) return null;
    if (this.logScale && value <= 0) return null;
    const x = this.logScale ? Math.log10(value) : value;
    const [low, high] = range;
    return high > low ? (x - low) / (high - low) : 0.5;
  }

  draw() {
    const width = Math.floor(this.canvasBox.clientWidth);
    if (width <= 0) return;
    const rowHeight = this.rowHeight();
    const plotHeight = Math.max(rowHeight, Math.round(this.rows.length * rowHeight));
    const height = plotHeight + AXIS_HEIGHT;
    const ratio = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(height * ratio);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    if (this.status) {
      this.drawLegend(null); // a blank plot under the status sentence: no stale or all-missing cells
      return;
    }
    const columns = this.columns.length;
    const range = this.range();
    if (!columns || !this.rows.length) {
      ctx.fillStyle = "#888";
      ctx.font = "13px system-ui, sans-serif";
      ctx.fillText("No statistics recorded yet.", 8, 18);
      this.drawLegend(null);
      return;
    }
    const cellWidth = width / columns;
    for (let r = 0; r < this.rows.length; r++) {
      for (let c = 0; c < columns; c++) {
        const t = this.position(this.values[r]?.[c] ?? null, range);
        ctx.fillStyle = t === null ? MISSING : colorAt(t);
        const x0 = Math.floor(c * cellWidth);
        const y0 = Math.floor(r * rowHeight);
        ctx.fillRect(x0, y0, Math.ceil((c + 1) * cellWidth) - x0, Math.ceil((r + 1) * rowHeight) - y0);
      }
    }
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#d55e00";
    if (this.selectedRow >= 0 && this.selectedRow < this.rows.length) {
      ctx.strokeRect(1, this.selectedRow * rowHeight + 1, width - 2, rowHeight - 2);
    }
    if (this.selectedColumn >= 0 && this.selectedColumn < columns) {
      ctx.strokeRect(this.selectedColumn * cellWidth + 1, 1, Math.max(2, cellWidth - 2), plotHeight - 2);
    }
    this.drawAxis(ctx, width, plotHeight, cellWidth);
    this.drawLegend(range);
  }

  drawAxis(ctx, width, top, cellWidth) {
    ctx.fillStyle = "#444";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    const columns = this.columns.length;
    const ticks = Math.max(1, Math.min(columns, Math.floor(width / 70)));
    let lastRight = -Infinity;
    for (let k = 0; k < ticks; k++) {
      const c = ticks === 1 ? 0 : Math.round((k * (columns - 1)) / (ticks - 1));
      const label = String(this.columns[c]);
      const textWidth = ctx.measureText(label).width;
      const x = Math.min(width - textWidth, Math.max(0, (c + 0.5) * cellWidth - textWidth / 2));
      if (x < lastRight + 6) continue;
      ctx.fillText(label, x, top + 5);
      lastRight = x + textWidth;
    }
  }

  drawLegend(range) {
    const format = this.options.format || ((v) => num(v, 3));
    if (!range) {
      replace(this.legend);
      return;
    }
    const bar = h("canvas", { class: "heatmap-colorbar", width: 160, height: 10 });
    const ctx = bar.getContext("2d");
    for (let x = 0; x < 160; x++) {
      ctx.fillStyle = colorAt(x / 159);
      ctx.fillRect(x, 0, 1, 10);
    }
    const [low, high] = this.logScale ? range.map((v) => 10 ** v) : range;
    replace(
      this.legend,
      h("span", { class: "legend-low" }, format(low)),
      bar,
      h("span", { class: "legend-high" }, format(high)),
      this.logScale ? h("span", { class: "muted" }, " (log scale)") : null,
      h("span", { class: "legend-missing" }, h("i", { class: "swatch-missing" }), " no value"),
    );
  }

  cellAt(event) {
    if (this.status) return null;
    const rect = this.canvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const column = Math.floor((x / rect.width) * this.columns.length);
    const row = Math.floor(y / this.rowHeight());
    if (row < 0 || row >= this.rows.length || column < 0 || column >= this.columns.length) return null;
    return { row, column, x, y };
  }

  hover(event) {
    const cell = this.cellAt(event);
    if (!cell) {
      this.tooltip.hidden = true;
      return;
    }
    const value = this.values[cell.row]?.[cell.column];
    const format = this.options.format || ((v) => num(v, 4));
    replace(
      this.tooltip,
      h("strong", {}, `${this.options.rowLabel} ${this.rows[cell.row]}`),
      h("br"),
      `${this.options.columnLabel} ${this.columns[cell.column]}: `,
      value === null || value === undefined ? "no value" : format(value),
    );
    this.tooltip.hidden = false;
    const boxWidth = this.canvasBox.clientWidth;
    this.tooltip.style.left = `${Math.min(cell.x + 12, Math.max(0, boxWidth - 220))}px`;
    this.tooltip.style.top = `${cell.y + 12}px`;
  }

  destroy() {
    this.resizer.disconnect();
  }
}
