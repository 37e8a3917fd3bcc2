// The job submission form, rendered from the service's own OpenAPI schema of the job spec.
//
// Every field of JobSpec appears with its description, default and (for choices) its options, so the form
// follows the spec without edits here. The API is the one judge of validity: the form sends what was typed
// (numbers as numbers, anything unparsable as the raw text) and shows each 422 sentence next to the field it
// names. The only spec knowledge kept here is which fields apply to which variant (APPLIES_WHEN), so fields that
// do not apply are hidden and left out of the body, as the spec's validators expect.
// A field whose schema carries `x-options-from` (e.g. `model`: "/v1/models") is a choice among what that route lists
// now (`data[].name`), read when the form loads; the service still judges the submitted name.

import { h, replace } from "./dom.js";

/** Field -> [controlling field, value or list of values]: shown (and sent) only when the controlling field has
 * (one of) that value. */
const APPLIES_WHEN = {
  "dataset.num_samples": ["dataset.kind", "synthetic"],
  "dataset.num_classes": ["dataset.kind", "synthetic"],
  "dataset.input_shape": ["dataset.kind", "synthetic"],
  "dataset.path": ["dataset.kind", "npz"],
  "dataset.uri": ["dataset.kind", ["image_folder", "parquet"]],
  "dataset.val_uri": ["dataset.kind", ["image_folder", "parquet"]],
  "dataset.image_size": ["dataset.kind", ["image_folder", "parquet"]],
  "dataset.channels": ["dataset.kind", ["image_folder", "parquet"]],
  "dataset.mean": ["dataset.kind", ["image_folder", "parquet"]],
  "dataset.std": ["dataset.kind", ["image_folder", "parquet"]],
  "dataset.image_column": ["dataset.kind", "parquet"],
  "dataset.label_column": ["dataset.kind", "parquet"],
  "optimizer.momentum": ["optimizer.name", "sgd"],
  "optimizer.nesterov": ["optimizer.name", "sgd"],
  "lr_schedule.step_epochs": ["lr_schedule.name", "step"],
  "lr_schedule.gamma": ["lr_schedule.name", "step"],
  "lr_schedule.min_lr": ["lr_schedule.name", "cosine"],
  sync_group_size: ["sync_bn", true],
};

const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

/** Fetch the service's OpenAPI document and return the request body schema of POST /v1/jobs with its components. */
export async function loadSpecSchema(api) {
  const response = await fetch(api.url("openapi.json"), { headers: api.headers({ Accept: "application/json" }) });
  if (!response.ok) throw new Error(`could not read the API schema (HTTP ${response.status})`);
  const document = await response.json();
  const body = document.paths?.["/v1/jobs"]?.post?.requestBody?.content?.["application/json"]?.schema;
  if (!body) throw new Error("the API schema has no request body for POST /v1/jobs");
  const components = document.components?.schemas || {};
  const lists = {};
  for (const [name, property] of Object.entries(resolve(body, components).properties || {})) {
    const source = property["x-options-from"];
    if (!source) continue;
    try {
      const listed = await api.get(source.replace(/^\/+/, ""));
      lists[name] = (listed.data || []).map((item) => ({ value: item.name, package: item.package, summary: item.summary }));
    } catch {
      // Without the list the field stays a text input; the service still names what it can build in its 422.
    }
  }
  return { root: body, components, lists };
}

function resolve(schema, components) {
  let current = schema;
  for (let depth = 0; current?.$ref && depth < 10; depth++) {
    current = components[current.$ref.split("/").pop()];
  }
  return current || {};
}

/** Describe one property: a group of fields (object) or a single field, with nullability folded in. */
function describe(name, path, schema, components, lists = {}) {
  let nullable = false;
  let inner = schema;
  if (Array.isArray(schema.anyOf)) {
    const members = schema.anyOf.filter((s) => s.type !== "null");
    nullable = members.length < schema.anyOf.length;
    inner = members.length === 1 ? members[0] : { type: "string" };
  }
  const resolved = resolve(inner, components);
  const description = schema.description || resolved.description || "";
  const base = { name, path, nullable, description, default: schema.default };
  if (resolved.type === "object" && resolved.properties) {
    const children = Object.entries(resolved.properties).map(([child, childSchema]) =>
      describe(child, `${path}.${child}`, childSchema, components),
    );
    return { ...base, kind: "group", title: resolved.title || name, children };
  }
  const field = { ...base, kind: "field", type: resolved.type || "string" };
  if (lists[path]?.length) {
    field.type = "enum";
    field.options = lists[path].map((item) => item.value);
    field.optionInfo = new Map(lists[path].map((item) => [item.value, item]));
  } else if (Array.isArray(resolved.enum)) {
    field.type = "enum";
    field.options = resolved.enum;
  } else if (resolved.type === "array") {
    field.type = "list";
    field.itemType = resolve(resolved.items || {}, components).type || "string";
  }
  field.minimum = resolved.minimum ?? resolved.exclusiveMinimum;
  field.maximum = resolved.maximum ?? resolved.exclusiveMaximum;
  field.exclusiveMinimum = resolved.minimum === undefined && resolved.exclusiveMinimum !== undefined;
  field.exclusiveMaximum = resolved.maximum === undefined && resolved.exclusiveMaximum !== undefined;
  field.multipleOf = resolved.multipleOf;
  return field;
}

function parseNumber(text) {
  return NUMBER.test(text) ? Number(text) : text;
}

export class SpecForm {
  /**
   * @param {{root, components}} schema  from loadSpecSchema()
   * @param {(body) => Promise} onSubmit  sends the body; rejects with an ApiError to show
   */
  constructor(schema, onSubmit) {
    this.onSubmit = onSubmit;
    const root = resolve(schema.root, schema.components);
    this.fields = new Map(); // path -> {spec, input, wrapper, error}
    this.groups = new Map(); // path -> {spec, toggle, wrapper, error}
    this.specs = Object.entries(root.properties || {}).map(([name, s]) =>
      describe(name, name, s, schema.components, schema.lists || {}),
    );
    this.formError = h("div", { class: "form-error", role: "alert", hidden: true, id: "form-error" });
    this.submitButton = h("button", { type: "submit", class: "primary", id: "submit-job" }, "Submit job");
    this.element = h(
      "form",
      { class: "spec-form", novalidate: true, id: "spec-form", onsubmit: (e) => this.submit(e) },
      this.formError,
      this.renderLevel(this.specs, ""),
      h("div", { class: "form-actions" }, this.submitButton, h("span", { class: "muted", id: "submit-state" })),
    );
    this.element.addEventListener("change", () => this.updateVisibility());
    this.reset();
  }

  /** Consecutive plain fields share one grid; each group (object) gets its own fieldset. */
  renderLevel(specs, path) {
    const blocks = [];
    let grid = null;
    for (const spec of specs) {
      if (spec.kind === "group") {
        grid = null;
        blocks.push(this.renderGroup(spec));
      } else {
        if (!grid) {
          grid = h("div", { class: "field-grid" });
          blocks.push(grid);
        }
        grid.append(this.renderField(spec));
      }
    }
    return h("div", { class: "form-level", "data-level": path || "job" }, blocks);
  }

  renderGroup(spec) {
    const error = h("p", { class: "field-error", "data-error-for": spec.path, role: "alert", hidden: true });
    let toggle = null;
    const legend = h("legend", {}, h("code", {}, spec.name));
    if (spec.nullable) {
      toggle = h("input", { type: "checkbox", name: `${spec.path}.__enabled`, id: `enable-${spec.path}` });
      legend.append(" ", h("label", { class: "group-toggle", for: toggle.id }, toggle, " use"));
    }
    const wrapper = h(
      "fieldset",
      { class: "field-group", "data-group": spec.path },
      legend,
      h("p", { class: "help" }, spec.description),
      error,
      this.renderLevel(spec.children, spec.path),
    );
    this.groups.set(spec.path, { spec, toggle, wrapper, error });
    return wrapper;
  }

  renderField(spec) {
    const id = `field-${spec.path.replaceAll(".", "-")}`;
    let input;
    if (spec.type === "enum") {
      input = h(
        "select",
        { name: spec.path, id },
        spec.options.map((option) => {
          const info = spec.optionInfo?.get(option);
          const label = info && info.package !== "syncbn" ? `${option} (${info.package})` : option;
          return h("option", { value: option, title: info?.summary || null }, label);
        }),
      );
    } else if (spec.type === "boolean") {
      input = h("input", { type: "checkbox", name: spec.path, id });
    } else {
      const numeric = spec.type === "integer" || spec.type === "number";
      input = h("input", {
        type: "text",
        name: spec.path,
        id,
        inputmode: numeric ? (spec.type === "integer" ? "numeric" : "decimal") : null,
        placeholder: spec.nullable ? "none" : spec.type === "list" ? "e.g. 3, 16, 16" : null,
        spellcheck: "false",
        autocomplete: "off",
      });
    }
    const error = h("p", { class: "field-error", id: `${id}-error`, "data-error-for": spec.path, hidden: true });
    error.setAttribute("role", "alert");
    input.setAttribute("aria-describedby", `${id}-help ${id}-error`);
    const range = this.rangeText(spec);
    const wrapper = h(
      "div",
      { class: `field field-${spec.type}`, "data-field": spec.path },
      h("label", { for: id }, h("code", {}, spec.name)),
      input,
      h("p", { class: "help", id: `${id}-help` }, spec.description, range ? h("span", { class: "range" }, range) : null),
      error,
    );
    this.fields.set(spec.path, { spec, input, wrapper, error });
    return wrapper;
  }

  rangeText(spec) {
    const parts = [];
    if (spec.minimum !== undefined) parts.push(`${spec.exclusiveMinimum ? ">" : "≥"} ${spec.minimum}`);
    if (spec.maximum !== undefined) parts.push(`${spec.exclusiveMaximum ? "<" : "≤"} ${spec.maximum}`);
    if (spec.multipleOf !== undefined) parts.push(`steps of ${spec.multipleOf}`);
    return parts.length ? ` (${parts.join(", ")})` : "";
  }

  /** Put every field back to the schema's defaults. */
  reset() {
    for (const { spec, input } of this.fields.values()) this.setInput(spec, input, spec.default);
    for (const { spec, toggle } of this.groups.values()) {
      if (toggle) toggle.checked = spec.default !== undefined && spec.default !== null;
    }
    this.clearErrors();
    this.updateVisibility();
  }

  setInput(spec, input, value) {
    if (spec.type === "boolean") input.checked = Boolean(value);
    else if (spec.type === "enum") {
      const wanted = value ?? spec.options[0];
      // A cloned job may name a model this service no longer lists: keep it selectable, the service will judge it.
      if (![...input.options].some((option) => option.value === wanted)) input.append(h("option", { value: wanted }, wanted));
      input.value = wanted;
    }
    else if (spec.type === "list") input.value = Array.isArray(value) ? value.join(", ") : "";
    else input.value = value === null || value === undefined ? "" : String(value);
  }

  /** Fill the form from a (partial) spec object, e.g. a job's spec when cloning it; other fields keep theirs. */
  setValues(values, prefix = "") {
    for (const [key, value] of Object.entries(values || {})) {
      const path = prefix ? `${prefix}.${key}` : key;
      const group = this.groups.get(path);
      if (group) {
        if (group.toggle) group.toggle.checked = value !== null && value !== undefined;
        if (value && typeof value === "object") this.setValues(value, path);
      } else if (this.fields.has(path)) {
        const { spec, input } = this.fields.get(path);
        this.setInput(spec, input, value);
      }
    }
    this.updateVisibility();
  }

  valueOf(path) {
    const field = this.fields.get(path);
    if (!field) return undefined;
    return field.spec.type === "boolean" ? field.input.checked : field.input.value;
  }

  applies(path) {
    const rule = APPLIES_WHEN[path];
    if (!rule) return true;
    const value = this.valueOf(rule[0]);
    return Array.isArray(rule[1]) ? rule[1].includes(value) : value === rule[1];
  }

  updateVisibility() {
    for (const [path, field] of this.fields) field.wrapper.hidden = !this.applies(path);
    for (const { toggle, wrapper } of this.groups.values()) {
      if (toggle) wrapper.classList.toggle("disabled", !toggle.checked);
      if (toggle) {
        for (const node of wrapper.querySelectorAll(".form-level input, .form-level select")) node.disabled = !toggle.checked;
      }
    }
  }

  /** The request body: the shown fields' values (hidden, not-applicable fields are left to their defaults). */
  body() {
    return this.collect(this.specs);
  }

  collect(specs) {
    const out = {};
    for (const spec of specs) {
      if (spec.kind === "group") {
        const group = this.groups.get(spec.path);
        out[spec.name] = group.toggle && !group.toggle.checked ? null : this.collect(spec.children);
        continue;
      }
      if (!this.applies(spec.path)) continue;
      const value = this.read(spec, this.fields.get(spec.path).input);
      if (value !== undefined) out[spec.name] = value;
    }
    return out;
  }

  read(spec, input) {
    if (spec.type === "boolean") return input.checked;
    if (spec.type === "enum") return input.value;
    const text = input.value.trim();
    if (text === "") return spec.nullable ? null : undefined; // undefined: left out, the API's default applies
    if (spec.type === "integer" || spec.type === "number") return parseNumber(text);
    if (spec.type === "list") {
      const items = text.split(/[\s,;]+/).filter(Boolean);
      return spec.itemType === "integer" || spec.itemType === "number" ? items.map(parseNumber) : items;
    }
    return input.value;
  }

  clearErrors() {
    this.formError.hidden = true;
    replace(this.formError);
    for (const { input, error } of this.fields.values()) {
      input.removeAttribute("aria-invalid");
      error.hidden = true;
      replace(error);
    }
    for (const { error, wrapper } of this.groups.values()) {
      error.hidden = true;
      wrapper.classList.remove("invalid");
      replace(error);
    }
  }

  /** Show an API error: each 422 entry next to its field, anything unplaced above the form. */
  showError(apiError) {
    this.clearErrors();
    const entries = apiError.errors?.length ? apiError.errors : [{ loc: [], message: apiError.detail }];
    const unplaced = [];
    for (const entry of entries) {
      const message = entry.message || entry.msg || apiError.detail;
      const path = this.placeFor(entry.loc || [], message);
      if (path && this.fields.has(path)) {
        const { input, error } = this.fields.get(path);
        input.setAttribute("aria-invalid", "true");
        error.append(h("span", {}, message));
        error.hidden = false;
      } else if (path && this.groups.has(path)) {
        const { error, wrapper } = this.groups.get(path);
        wrapper.classList.add("invalid");
        error.append(h("span", {}, message));
        error.hidden = false;
      } else {
        unplaced.push(message);
      }
    }
    if (unplaced.length) {
      replace(this.formError, h("strong", {}, `The service refused the job (HTTP ${apiError.status}): `), unplaced.join(" "));
      this.formError.hidden = false;
    }
    const first = this.element.querySelector("[aria-invalid='true'], fieldset.invalid, .form-error:not([hidden])");
    first?.scrollIntoView({ block: "center" });
    if (first?.matches("input, select")) first.focus();
  }

  /**
   * Which field an error belongs to: its location when that is a field; otherwise (an error about a whole object,
   * e.g. a cross-field check) the first visible field its sentence names, e.g. "lr_schedule.warmup_epochs ...".
   */
  placeFor(loc, message) {
    const parts = loc.map(String).filter((part, i) => !(i === 0 && part === "body"));
    for (let n = parts.length; n > 0; n--) {
      const path = parts.slice(0, n).join(".");
      if (this.fields.has(path)) return path;
      if (this.groups.has(path)) return this.mentioned(message, path) || path;
    }
    return this.mentioned(message, "");
  }

  mentioned(message, within) {
    let best = null;
    let bestAt = Infinity;
    for (const [path, { wrapper }] of this.fields) {
      if (wrapper.hidden || (within && !path.startsWith(`${within}.`))) continue;
      const escaped = path.replaceAll(".", "\\.");
      const match = new RegExp(`(^|[^\\w.])${escaped}(?![\\w])`).exec(message);
      if (match && match.index < bestAt) {
        best = path;
        bestAt = match.index;
      }
    }
    return best;
  }

  async submit(event) {
    event.preventDefault();
    this.clearErrors();
    const state = this.element.querySelector("#submit-state");
    this.submitButton.disabled = true;
    state.textContent = "Submitting…";
    try {
      await this.onSubmit(this.body());
      state.textContent = "";
    } catch (error) {
      state.textContent = "";
      if (error.status) this.showError(error);
      else this.showError({ status: "network error", detail: error.message, errors: [] });
    } finally {
      this.submitButton.disabled = false;
    }
  }
}
