// A submission form rendered from the service's own OpenAPI schema of a request body: the job spec (POST
// /v1/jobs), or the study spec (POST /v1/studies, whose `base` is a whole job spec).
//
// Every field of the body appears with its description, default and (for choices) its options, so the form
// follows the spec without edits here. The API is the one judge of validity: the form sends what was typed
// (numbers as numbers, anything unparsable as the raw text) and shows each 422 sentence next to the field it
// names. The only spec knowledge kept here is which fields apply to which variant (APPLIES_WHEN), so fields that
// do not apply are hidden and left out of the body, as the spec's validators expect.
// A field whose schema carries `x-options-from` (e.g. `model`: "/v1/models") is a choice among what that route lists
// now (`data[].name`), read when the form loads; the service still judges the submitted name.
// A field the generic inputs cannot edit (the study's list of arms) gets a widget from the page (`custom`).

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

/**
 * Fetch the service's OpenAPI document and return the request body schema of POST `route` with its components, and
 * the lists of the fields with `x-options-from` (keyed by field path, e.g. "model" or "base.model").
 */
export async function loadSpecSchema(api, route = "/v1/jobs") {
  const response = await fetch(api.url("openapi.json"), { headers: api.headers({ Accept: "application/json" }) });
  if (!response.ok) throw new Error(`could not read the API schema (HTTP ${response.status})`);
  const document = await response.json();
  const body = document.paths?.[route]?.post?.requestBody?.content?.["application/json"]?.schema;
  if (!body) throw new Error(`the API schema has no request body for POST ${route}`);
  const components = document.components?.schemas || {};
  const lists = {};
  for (const [path, source] of optionSources(body, components)) {
    try {
      const listed = await api.get(source.replace(/^\/+/, ""));
      lists[path] = (listed.data || []).map((item) => ({ value: item.name, package: item.package, summary: item.summary }));
    } catch {
      // Without the list the field stays a text input; the service still names what it can build in its 422.
    }
  }
  return { root: body, components, lists };
}

/** [path, route] of every field with `x-options-from`, in nested objects too (not through arrays). */
function optionSources(schema, components, prefix = "", depth = 0) {
  const found = [];
  if (depth > 4) return found;
  for (const [name, property] of Object.entries(resolve(schema, components).properties || {})) {
    const path = prefix ? `${prefix}.${name}` : name;
    if (property["x-options-from"]) found.push([path, property["x-options-from"]]);
    else if (property.$ref) found.push(...optionSources(property, components, path, depth + 1));
  }
  return found;
}

/** The schema a `$ref` points to (followed up to 10 times), or the schema itself. */
export function resolve(schema, components) {
  let current = schema;
  for (let depth = 0; current?.$ref && depth < 10; depth++) {
    current = components[current.$ref.split("/").pop()];
  }
  return current || {};
}

/** A number or a list of integers (the study's `seeds`: N, or the seeds themselves). */
function isCountOrList(members) {
  return (
    members.length === 2
    && members.some((s) => s.type === "integer")
    && members.some((s) => s.type === "array" && s.items?.type === "integer")
  );
}

/** Describe one property: a group of fields (object) or a single field, with nullability folded in. */
export function describe(name, path, schema, components, lists = {}) {
  let nullable = false;
  let inner = schema;
  if (Array.isArray(schema.anyOf)) {
    const members = schema.anyOf.filter((s) => s.type !== "null");
    nullable = members.length < schema.anyOf.length;
    inner = members.length === 1 ? members[0] : isCountOrList(members) ? { type: "count_or_list" } : { type: "string" };
  }
  const resolved = resolve(inner, components);
  const description = schema.description || resolved.description || "";
  const base = { name, path, nullable, description, default: schema.default };
  if (resolved.type === "object" && resolved.properties) {
    const children = Object.entries(resolved.properties).map(([child, childSchema]) =>
      describe(child, `${path}.${child}`, childSchema, components, lists),
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
    field.items = resolved.items || {};
    field.itemType = resolve(field.items, components).type || "string";
  }
  field.minimum = resolved.minimum ?? resolved.exclusiveMinimum;
  field.maximum = resolved.maximum ?? resolved.exclusiveMaximum;
  field.exclusiveMinimum = resolved.minimum === undefined && resolved.exclusiveMinimum !== undefined;
  field.exclusiveMaximum = resolved.maximum === undefined && resolved.exclusiveMaximum !== undefined;
  field.multipleOf = resolved.multipleOf;
  return field;
}

/** A typed number as a number; anything else as the text (the API then says what is wrong with it). */
export function parseNumber(text) {
  return NUMBER.test(text) ? Number(text) : text;
}

/** The part of an error location below a field's path, e.g. ["1", "batch_size"] for "arms" of body.arms.1.batch_size. */
function locWithin(loc, path) {
  const parts = loc.map(String).filter((part, i) => !(i === 0 && part === "body"));
  const depth = path.split(".").length;
  return parts.slice(0, depth).join(".") === path ? parts.slice(depth) : [];
}

export class SpecForm {
  /**
   * @param {{root, components, lists}} schema  from loadSpecSchema()
   * @param {(body) => Promise} onSubmit  sends the body; rejects with an ApiError to show
   * @param {object} options  noun ("job": what the service refuses), submitLabel, submitId;
   *   scope: the path of the job spec inside the body ("base" for a study), for APPLIES_WHEN and for errors that
   *   name a job spec field without it (e.g. an unknown `model`);
   *   custom: {path: (fieldSpec, components) => widget} for fields the generic inputs cannot edit; a widget has
   *   `element`, `setValue(value)` (undefined: its initial value), `value()`, and optionally `mark(loc, message)`
   *   and `clearMarks()` to point at the part of it an error names;
   *   last: names of top-level fields shown after the others (the study's long `base` after its own fields)
   */
  constructor(schema, onSubmit, options = {}) {
    this.onSubmit = onSubmit;
    this.options = { noun: "job", submitLabel: "Submit job", submitId: "submit-job", scope: "", custom: {}, last: [], ...options };
    this.components = schema.components;
    const root = resolve(schema.root, schema.components);
    this.fields = new Map(); // path -> {spec, input, wrapper, error, widget}
    this.groups = new Map(); // path -> {spec, toggle, wrapper, error}
    const specs = Object.entries(root.properties || {}).map(([name, s]) =>
      describe(name, name, s, schema.components, schema.lists || {}),
    );
    const last = new Set(this.options.last);
    this.specs = [...specs.filter((s) => !last.has(s.name)), ...specs.filter((s) => last.has(s.name))];
    this.formError = h("div", { class: "form-error", role: "alert", hidden: true, id: "form-error" });
    this.submitButton = h("button", { type: "submit", class: "primary", id: this.options.submitId }, this.options.submitLabel);
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
    const makeWidget = this.options.custom[spec.path];
    const widget = makeWidget ? makeWidget(spec, this.components) : null;
    let input;
    if (widget) {
      input = widget.element;
      input.id = id;
    } else if (spec.type === "enum") {
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
        placeholder: spec.nullable ? "none" : spec.type === "list" ? "e.g. 3, 16, 16" : spec.type === "count_or_list" ? "e.g. 3, or 0, 1, 2" : null,
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
      { class: `field field-${spec.type}${widget ? " field-custom" : ""}`, "data-field": spec.path },
      h("label", { for: id }, h("code", {}, spec.name)),
      input,
      h("p", { class: "help", id: `${id}-help` }, spec.description, range ? h("span", { class: "range" }, range) : null),
      error,
    );
    this.fields.set(spec.path, { spec, input, wrapper, error, widget });
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
    for (const field of this.fields.values()) this.setField(field, field.spec.default);
    for (const { spec, toggle } of this.groups.values()) {
      if (toggle) toggle.checked = spec.default !== undefined && spec.default !== null;
    }
    this.clearErrors();
    this.updateVisibility();
  }

  setField({ spec, input, widget }, value) {
    if (widget) widget.setValue(value);
    else this.setInput(spec, input, value);
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
    else if (spec.type === "count_or_list") input.value = Array.isArray(value) ? value.join(", ") : value === null || value === undefined ? "" : String(value);
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
        this.setField(this.fields.get(path), value);
      }
    }
    this.updateVisibility();
  }

  valueOf(path) {
    const field = this.fields.get(path);
    if (!field) return undefined;
    return field.spec.type === "boolean" ? field.input.checked : field.input.value;
  }

  /** Whether a field applies: APPLIES_WHEN's rules are paths within the job spec, i.e. under `scope`. */
  applies(path) {
    const scope = this.options.scope;
    const within = scope ? (path.startsWith(`${scope}.`) ? path.slice(scope.length + 1) : null) : path;
    const rule = within === null ? null : APPLIES_WHEN[within];
    if (!rule) return true;
    const value = this.valueOf(scope ? `${scope}.${rule[0]}` : rule[0]);
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
      const field = this.fields.get(spec.path);
      const value = field.widget ? field.widget.value() : this.read(spec, field.input);
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
    if (spec.type === "count_or_list") {
      const items = text.split(/[\s,;]+/).filter(Boolean).map(parseNumber);
      return /[\s,;]/.test(text) ? items : items[0];
    }
    return input.value;
  }

  clearErrors() {
    this.formError.hidden = true;
    replace(this.formError);
    for (const { input, error, widget } of this.fields.values()) {
      input.removeAttribute("aria-invalid");
      widget?.clearMarks?.();
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
        const { input, error, widget } = this.fields.get(path);
        input.setAttribute("aria-invalid", "true");
        widget?.mark?.(locWithin(entry.loc || [], path), message);
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
      replace(this.formError, h("strong", {}, `The service refused the ${this.options.noun} (HTTP ${apiError.status}): `), unplaced.join(" "));
      this.formError.hidden = false;
    }
    const first = this.element.querySelector("[aria-invalid='true'], fieldset.invalid, .form-error:not([hidden])");
    first?.scrollIntoView({ block: "center" });
    const control = first?.matches("input, select") ? first : first?.querySelector("[aria-invalid='true']");
    control?.focus();
  }

  /**
   * Which field an error belongs to: its location when that is a field; otherwise (an error about a whole object,
   * e.g. a cross-field check) the first visible field its sentence names, e.g. "lr_schedule.warmup_epochs ...".
   * With a `scope`, a location or sentence naming a job spec field without it (an unknown `model`) means that
   * field of the job spec.
   */
  placeFor(loc, message) {
    const parts = loc.map(String).filter((part, i) => !(i === 0 && part === "body"));
    const scope = this.options.scope;
    const candidates = scope && parts.length && parts[0] !== scope && !this.fields.has(parts[0]) ? [parts, [scope, ...parts]] : [parts];
    for (const tried of candidates) {
      for (let n = tried.length; n > 0; n--) {
        const path = tried.slice(0, n).join(".");
        if (this.fields.has(path)) return path;
        if (this.groups.has(path)) return this.mentioned(message, path) || path;
      }
    }
    return this.mentioned(message, "") || (scope ? this.mentioned(message, scope) : null);
  }

  /**
   * The visible field (under `within`, if given) that `message` names first: by its path, or by its path relative
   * to `within` (a job spec's sentences say "epochs", not "base.epochs").
   */
  mentioned(message, within) {
    let best = null;
    let bestAt = Infinity;
    for (const [path, { wrapper }] of this.fields) {
      if (wrapper.hidden || (within && !path.startsWith(`${within}.`))) continue;
      const names = within ? [path, path.slice(within.length + 1)] : [path];
      for (const name of names) {
        const escaped = name.replaceAll(".", "\\.");
        const match = new RegExp(`(^|[^\\w.])${escaped}(?![\\w])`).exec(message);
        if (match && match.index < bestAt) {
          best = path;
          bestAt = match.index;
        }
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
