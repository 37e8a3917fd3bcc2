// The new-study page (#/studies/new, #/studies/new?from=<job id>, #/studies/new?study=<study id>).
//
// The form is the job form's (spec_form.js) built from the schema of POST /v1/studies: `base` is the whole job
// spec, then the study's own fields (arms as an editable table, seeds, metric, confidence, margin), each with the
// schema's description; 422 sentences land next to the field they name, as on the job form. `from=<job>` fills
// the base with that job's spec and asks the default question: sync_bn on against off, over 3 seeds.

import { ArmsEditor, DEFAULT_ARMS } from "./arms_editor.js";
import { h, jobLabel, replace, shortId } from "./dom.js";
import { loadSpecSchema, SpecForm } from "./spec_form.js";

/** Seeds of the study a job page's button asks for (StudySpec's default). */
const DEFAULT_SEEDS = 3;

/** The arms comparing a job's BatchNorm synchronised and local: a group size applies to the synchronised arm only. */
export function syncArms(spec) {
  const local = { ...DEFAULT_ARMS[1] };
  if (spec.sync_group_size !== null && spec.sync_group_size !== undefined) local.sync_group_size = null;
  return [{ ...DEFAULT_ARMS[0] }, local];
}

export class NewStudyPage {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.fromJob = params.query.get("from");
    this.fromStudy = params.query.get("study");
  }

  async mount(root) {
    const formBox = h("div", { id: "form-box" }, h("p", { class: "muted" }, "Reading the study spec's schema…"));
    this.note = h("p", { class: "muted", id: "form-note" });
    replace(
      root,
      h("div", { class: "page-head" }, h("h1", {}, "Start a study")),
      h(
        "p",
        { class: "help" },
        "A study runs the base job once per arm and seed, and compares the arms seed by seed. By default it asks "
          + "whether synchronised BatchNorm (the first arm) beats local BatchNorm on validation accuracy, over 3 seeds. "
          + "Every trial is an ordinary job of yours in the queue.",
      ),
      this.note,
      formBox,
    );
    let schema;
    try {
      schema = await loadSpecSchema(this.ctx.api, "/v1/studies");
    } catch (error) {
      replace(formBox, h("p", { class: "error-text" }, error.message));
      return;
    }
    this.form = new SpecForm(schema, (body) => this.submit(body), {
      noun: "study",
      submitLabel: "Submit study",
      submitId: "submit-study",
      scope: "base",
      last: ["base"],
      custom: { arms: (spec, components) => new ArmsEditor(spec, components) },
    });
    replace(formBox, this.form.element);
    if (this.fromJob) await this.prefillFromJob();
    else if (this.fromStudy) await this.prefillFromStudy();
  }

  async prefillFromJob() {
    try {
      const job = await this.ctx.api.get(`v1/jobs/${encodeURIComponent(this.fromJob)}`);
      const label = job.name || shortId(job.id);
      this.form.setValues({
        name: `${label}: is SyncBN worth it?`.slice(0, 100),
        base: job.spec,
        arms: syncArms(job.spec),
        seeds: DEFAULT_SEEDS,
      });
      this.note.textContent =
        `The base is ${jobLabel(job)}'s spec; the arms run it with sync_bn on and off, over seeds 0 to ${DEFAULT_SEEDS - 1} `
        + `(the job's own seed, ${job.spec.seed}, is replaced by each trial's).`;
    } catch (error) {
      this.note.textContent = `Could not read job ${this.fromJob}: ${error.message}`;
    }
  }

  async prefillFromStudy() {
    try {
      const study = await this.ctx.api.get(`v1/studies/${encodeURIComponent(this.fromStudy)}`);
      this.form.setValues(study.spec);
      this.note.textContent = `Filled with the spec of study ${study.name || shortId(study.id)}.`;
    } catch (error) {
      this.note.textContent = `Could not read study ${this.fromStudy}: ${error.message}`;
    }
  }

  async submit(body) {
    const study = await this.ctx.api.post("v1/studies", body);
    this.ctx.flash(`Study ${study.name || shortId(study.id)} submitted: ${study.trials.length} trials queued.`);
    this.ctx.navigate(`#/studies/${encodeURIComponent(study.id)}`);
  }

  unmount() {}
}
