// The arms of a study as an editable table: one row per arm, one column per field an arm may override.
//
// The columns come from the schema of the arms' items (ArmSpec: sync_bn, sync_group_size, batch_size, workers,
// precision), so a field added to ArmSpec appears here without edits. A cell left at "base" (or blank) keeps the
// base job's value: the arm leaves the field out. `null` typed in a number cell is sent as null (for
// sync_group_size: all ranks). As in the rest of the form, the API judges what was typed: a 422 naming
// `arms.1.batch_size` or `arms[1]` marks that row (and cell) and its sentence shows under the table.

import { h, replace } from "./dom.js";
import { describe, parseNumber, resolve } from "./spec_form.js";

/** What a study runs when its spec names no arms (StudySpec's default): synchronised, then local BatchNorm. */
export const DEFAULT_ARMS = [{ sync_bn: true }, { sync_bn: false }];

const KEEP = "";

export class ArmsEditor {
  /**
   * @param {object} fieldSpec  the form's description of the `arms` field (its `items` schema names ArmSpec)
   * @param {object} components  the OpenAPI components, to resolve ArmSpec
   */
  constructor(fieldSpec, components) {
    const item = resolve(fieldSpec.items || {}, components);
    this.columns = Object.entries(item.properties || {}).map(([name, schema]) => describe(name, name, schema, components));
    this.rows = []; // [{tr, cells: Map(name -> control)}]
    this.body = h("tbody", {});
    this.addButton = h("button", { type: "button", class: "small", id: "add-arm", onclick: () => this.addRow({}) }, "Add arm");
    this.element = h(
      "div",
      { class: "arms-editor", "data-widget": "arms" },
      h(
        "table",
        { class: "diff arms-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", { scope: "col" }, "arm"),
            this.columns.map((column) => h("th", { scope: "col", title: column.description }, h("code", {}, column.name))),
            h("th", {}),
          ),
        ),
        this.body,
      ),
      h("div", { class: "controls" }, this.addButton),
      h(
        "p",
        { class: "help" },
        "The first arm is the reference the others are compared against. “base” keeps the base job's value; "
          + "type null in a number cell to clear the base's value (sync_group_size null: all ranks).",
      ),
    );
    this.setValue(undefined);
  }

  /** Show these arms (a list of overrides); undefined: the default arms. */
  setValue(arms) {
    replace(this.body);
    this.rows = [];
    for (const arm of Array.isArray(arms) ? arms : DEFAULT_ARMS) this.addRow(arm || {});
  }

  addRow(arm) {
    const cells = new Map();
    const tr = h("tr", { "data-arm": this.rows.length });
    const row = { tr, cells };
    tr.append(h("th", { scope: "row", class: "arm-index" }, ""));
    for (const column of this.columns) {
      const control = this.control(column);
      this.setCell(column, control, arm[column.name]);
      cells.set(column.name, control);
      tr.append(h("td", {}, control));
    }
    tr.append(
      h("td", {}, h("button", { type: "button", class: "small link", "data-action": "remove-arm", onclick: () => this.removeRow(row) }, "remove")),
    );
    this.rows.push(row);
    this.body.append(tr);
    this.renumber();
  }

  removeRow(row) {
    this.rows = this.rows.filter((other) => other !== row);
    row.tr.remove();
    this.renumber();
  }

  renumber() {
    this.rows.forEach((row, index) => {
      row.tr.dataset.arm = String(index);
      row.tr.querySelector(".arm-index").textContent = index === 0 ? "0 (reference)" : String(index);
      for (const [name, control] of row.cells) {
        control.name = `arms.${index}.${name}`;
        control.setAttribute("aria-label", `arm ${index} ${name}`);
      }
    });
  }

  control(column) {
    if (column.type === "boolean" || column.type === "enum") {
      const options = column.type === "boolean" ? ["true", "false"] : column.options;
      return h("select", {}, h("option", { value: KEEP }, "base"), options.map((option) => h("option", { value: option }, option)));
    }
    return h("input", { type: "text", placeholder: "base", spellcheck: "false", autocomplete: "off", size: 6 });
  }

  setCell(column, control, value) {
    if (value === undefined) control.value = KEEP;
    else if (value === null) control.value = column.type === "boolean" || column.type === "enum" ? KEEP : "null";
    else control.value = String(value);
  }

  /** The arms as the API takes them: per row, the fields it sets (numbers as numbers, other text as typed). */
  value() {
    return this.rows.map(({ cells }) => {
      const arm = {};
      for (const column of this.columns) {
        const text = cells.get(column.name).value.trim();
        if (text === KEEP) continue;
        if (column.type === "boolean") arm[column.name] = text === "true";
        else if (column.type === "enum") arm[column.name] = text;
        else if (text === "null") arm[column.name] = null;
        else arm[column.name] = column.type === "integer" || column.type === "number" ? parseNumber(text) : text;
      }
      return arm;
    });
  }

  /**
   * Point at the arm (and field) an error names: its location below `arms` (["1", "batch_size"]) or, for a check
   * of the whole spec, the `arms[i]` / `arms[i].field` its sentence begins with.
   */
  mark(loc, message) {
    let [index, field] = loc;
    if (index === undefined) {
      const named = /arms\[(\d+)\](?:\.(\w+))?/.exec(message || "");
      if (!named) return;
      [, index, field] = named;
    }
    const row = this.rows[Number(index)];
    if (!row) return;
    row.tr.classList.add("invalid");
    const control = row.cells.get(field) || row.cells.values().next().value;
    control?.setAttribute("aria-invalid", "true");
  }

  clearMarks() {
    for (const { tr, cells } of this.rows) {
      tr.classList.remove("invalid");
      for (const control of cells.values()) control.removeAttribute("aria-invalid");
    }
  }
}
