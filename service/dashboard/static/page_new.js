// The submit page (#/new, #/new?from=<id>[&flip=sync_bn]): the spec form, presets, and cloning a job.

import { h, jobLabel, replace } from "./dom.js";
import { loadSpecSchema, SpecForm } from "./spec_form.js";

/** A small digits run that finishes in well under a minute on a laptop: for a first look at the dashboard. */
const QUICK_LOOK = {
  name: "quick-digits",
  model: "small_resnet",
  dataset: { kind: "digits" },
  workers: 2,
  cpus_per_worker: 1,
  epochs: 3,
  batch_size: 16,
  steps_per_epoch: 20,
  stats_every: 2,
  checkpoint_every: 0,
};

export class NewJobPage {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.from = params.query.get("from");
    this.flip = params.query.get("flip");
  }

  async mount(root) {
    this.root = root;
    const formBox = h("div", { id: "form-box" }, h("p", { class: "muted" }, "Reading the job spec's schema…"));
    this.note = h("p", { class: "muted", id: "form-note" });
    replace(
      root,
      h(
        "div",
        { class: "page-head" },
        h("h1", {}, "Submit a training job"),
        h(
          "div",
          { class: "controls" },
          // Enabled once the form exists (it is built from the schema the service sends).
          h("button", { type: "button", id: "preset-quick", disabled: true, onclick: () => this.preset(QUICK_LOOK) }, "Quick look preset"),
          h("button", { type: "button", id: "preset-defaults", disabled: true, onclick: () => this.preset(null) }, "Defaults"),
        ),
      ),
      h(
        "p",
        { class: "help" },
        "Every field of the job spec, with the service's own descriptions. The service checks the spec; "
          + "anything it refuses is explained next to the field.",
      ),
      this.note,
      formBox,
    );
    let schema;
    try {
      schema = await loadSpecSchema(this.ctx.api);
    } catch (error) {
      replace(formBox, h("p", { class: "error-text" }, error.message));
      return;
    }
    this.form = new SpecForm(schema, (body) => this.submit(body));
    replace(formBox, this.form.element);
    for (const button of root.querySelectorAll("#preset-quick, #preset-defaults")) button.disabled = false;
    if (this.from) await this.clone();
  }

  preset(values) {
    this.form.reset();
    if (values) this.form.setValues(values);
    this.note.textContent = values ? "Filled with a small digits run (a minute or so on a laptop)." : "";
  }

  async clone() {
    try {
      const job = await this.ctx.api.get(`v1/jobs/${encodeURIComponent(this.from)}`);
      const spec = structuredClone(job.spec);
      let note = `Cloned from ${jobLabel(job)}.`;
      if (this.flip === "sync_bn") {
        spec.sync_bn = !spec.sync_bn;
        if (!spec.sync_bn) spec.sync_group_size = null;
        const base = (job.name || job.id.slice(0, 8)).replace(/ sync_bn (on|off)$/, "");
        spec.name = `${base} sync_bn ${spec.sync_bn ? "on" : "off"}`.slice(0, 100);
        note = `Cloned from ${jobLabel(job)} with sync_bn ${spec.sync_bn ? "on" : "off"} (same seed), to compare.`;
      }
      this.form.setValues(spec);
      this.note.textContent = note;
    } catch (error) {
      this.note.textContent = `Could not read job ${this.from}: ${error.message}`;
    }
  }

  async submit(body) {
    const job = await this.ctx.api.post("v1/jobs", body);
    this.ctx.flash(`Job ${jobLabel(job)} submitted (${job.status}).`);
    this.ctx.navigate(`#/jobs/${encodeURIComponent(job.id)}`);
  }

  unmount() {}
}
