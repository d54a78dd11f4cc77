"""The Training tab: data, method and Train; then live progress, loss plot and samples of the job; past runs with
"Use in Generate", download and push. Only widgets and wiring: jobs run in their own process (sd_demo.train.jobs),
and every value here is plain (paths, numbers, text)."""
from __future__ import annotations

import logging
import os
import secrets

import gradio as gr

from .. import zerogpu
from ..engine import Engine
from ..models import public_name, public_text
from ..train.config import Method, config_fields, from_values
from ..train.autocaption import DEFAULT_CAPTIONER
from ..train.jobs import PAUSED
from ..train.presets import PRESETS
from .generate import SHOWN, GenerateTab, UserError, add_lora, user_error

log = logging.getLogger(__name__)

AUTO = "Auto"  # the preset that fits the model, the device and the method
# Fields shown above the Advanced accordion, or owned by the job (paths on the server are not for the browser).
_MAIN = ("method", "model", "preset", "trigger", "instance_prompt")
_HIDDEN = ("data", "out", "resume", "overwrite", "push_to_hub", "public", "class_data", "preserve_prompts")
_TRI = {"preset": None, "on": True, "off": False}  # a yes/no option whose default comes from the preset
POLL_S = 2.0
DISABLED = ("Training is off on this public app. The owner turns it on with `python app.py --allow-training` "
            "(or `SD_DEMO_ALLOW_TRAINING=1` on a Space); uploads are then limited in count and size.")


def _advanced_input(name: str, default, meta: dict) -> gr.components.Component:
    kw = dict(label=name.replace("_", " "), info=meta.get("help", ""), elem_id=f"train-{name.replace('_', '-')}")
    typ = meta.get("type") or type(default)
    if meta.get("choices"):
        choices = (["preset"] if default is None else []) + list(meta["choices"])
        return gr.Dropdown(choices, value=default or "preset", **kw)
    if typ is bool and default is None:
        return gr.Dropdown(list(_TRI), value="preset", **kw)
    if typ is bool:
        return gr.Checkbox(value=default, **kw)
    if typ in (int, float) and default is not None:
        return gr.Number(value=default, **kw)
    if default is None:  # a Number cannot be empty: text, converted and checked by the engine
        return gr.Textbox("", placeholder="empty: the preset's value", **kw)
    return gr.Textbox(value=default or "", **kw)


def _advanced_components(per_row: int = 4) -> dict[str, gr.components.Component]:
    """One input per engine option (the same fields the CLI's flags come from), each with its one line of help;
    options the preset decides start empty."""
    items = [(n, d, m) for n, d, m in config_fields() if n not in _MAIN and n not in _HIDDEN]
    comps = {}
    for i in range(0, len(items), per_row):
        with gr.Row(equal_height=True):
            for name, default, meta in items[i:i + per_row]:
                with gr.Column(min_width=220):  # the row wraps rather than squeeze a checkbox into a sliver
                    comps[name] = _advanced_input(name, default, meta)
    return comps


def _form_values(names: list[str], values: list) -> dict:
    out = {}
    for name, value in zip(names, values):
        out[name] = _TRI.get(value, value) if isinstance(value, str) and value in _TRI else value
    return out


def _rows(table) -> list[tuple[str, object]]:
    """The caption table's rows as (file, caption), whatever form gradio hands it in (a DataFrame, whose empty cells
    are NaN, or lists); rows without a file name are dropped, the captions are checked by write_captions."""
    if table is None:
        return []
    data = table.values.tolist() if hasattr(table, "values") else table
    if not isinstance(data, list):
        raise ValueError("captions: the caption table must be rows of (file, caption)")
    rows = [r for r in data if isinstance(r, (list, tuple)) and r and isinstance(r[0], str) and r[0]]
    return [(r[0], r[1] if len(r) > 1 and r[1] == r[1] else None) for r in rows]  # (NaN != NaN)


def loss_frame(rows: list[tuple[int, float, str]]):
    """The loss plot's data, None (an empty plot) until the first loss: a chart first drawn from an empty frame
    read its columns as categories, then drew no line at all for the rest of the run."""
    import pandas as pd

    if not rows:
        return None
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": int, "loss": float})


def _job_outputs(engine: Engine, job_id: str, public: bool, visitor: str | None) -> tuple:
    """(job id, progress markdown, loss plot rows, sample images, log tail, runs table) of one job this visitor
    may see (a ValueError otherwise)."""
    view = engine.jobs.view(engine.own_job(job_id, public, visitor))
    notes = "\n".join(f"- {m}" for m in view.messages[-6:])
    status = f"{view.progress_line()} · `{job_id}`\n\n{notes}"
    plot = loss_frame(view.loss_rows())
    samples = [(str(p), f"step {view.sample_step}") for p in view.samples]
    log = engine.jobs.log_tail(job_id)
    if public:  # the job's messages and log name the model's folder and the job's own: no paths of this machine
        status, log = public_text(status), public_text(log)
    return job_id, status, plot, samples, log, _runs_table(engine, public, visitor)


def _preset_note(meth: str, base: str, pre: str, trig: str = "", table=None, prompt: str = "") -> str:
    """What the preset will set (Advanced fields left empty take these values), with the trigger it will find in
    the captions (the instance prompt standing in for an empty one)."""
    from ..train.presets import describe

    captions = [cap.strip() or (prompt or "").strip() for _, cap in _rows(table)]
    try:
        return describe(from_values({"method": meth, "model": base, "preset": None if pre == AUTO else pre,
                                     "trigger": trig}), captions)
    except ValueError as exc:
        return f"⚠️ {exc}"


def _runs_table(engine: Engine, public: bool, visitor: str | None) -> list[list]:
    rows = []
    for job in engine.visible_jobs(public, visitor)[:50]:
        v = engine.jobs.summary(job)
        loss = f"{v.final_loss:.4f}" if v.final_loss is not None else ""
        rows.append([job, v.state, v.config.get("method", ""), public_name(v.config.get("model", "")),
                     f"{v.step}/{v.total}", loss])
    return rows


def _slices(engine: Engine, public: bool):
    """ZeroGPU: a handler that trains the shown job slice by slice, each slice one GPU call (``spaces.GPU`` lends
    the GPU to a process it forks for the call), showing the job after each; it ends when the job is no longer
    paused (finished, stopped, failed), or when the visitor leaves (gradio closes it; Resume goes on later)."""
    import spaces

    def gpu_slice(job_id: str, seconds: int) -> str:
        return engine.jobs.run_slice(job_id, seconds - zerogpu.SLICE_END_S)

    gpu_slice = spaces.GPU(gpu_slice, duration=lambda job_id, seconds: seconds)

    def train_slices(job_id: str, who: str | None):
        try:
            engine.own_job(job_id, public, who)
            while engine.jobs.state(job_id) == PAUSED:
                view = engine.jobs.summary(job_id)
                with engine.jobs.slicing(job_id):
                    gpu_slice(job_id, zerogpu.slice_seconds(view.total - view.step, view.sec_per_step))
                yield _job_outputs(engine, job_id, public, who)
        except Exception as exc:
            raise user_error(exc) from None

    return train_slices


def data_state() -> gr.BrowserState:
    """The folder of the data this browser staged: it outlives a page reload in this browser alone (gradio encrypts
    what it stores there). Create it outside the tabs: a tab's components (and so its stored value) are not there
    until the tab is first opened, after the page's load event."""
    return gr.BrowserState("", storage_key="sd-demo-train-data")


def visitor_state(page: gr.Blocks) -> gr.State:
    """Who this browser is, for the training runs a public app shows it (Engine.visible_jobs): a Space visitor's
    Hugging Face name when signed in, else a random id this browser keeps across reloads (in its local storage,
    encrypted by gradio); ``~`` marks the latter, as no Hub name has one. Call at the top of ``page``."""
    browser = gr.BrowserState("", storage_key="sd-demo-visitor")
    who = gr.State(None)

    def identify(browser_id: str, profile: gr.OAuthProfile | None = None):
        browser_id = browser_id or secrets.token_hex(16)
        return browser_id, profile.username if profile else f"~{browser_id}"

    page.load(identify, browser, [browser, who], api_visibility="private")
    return who


def build(engine: Engine, gen: GenerateTab, tabs: gr.Tabs, generate_tab_id: str, page: gr.Blocks,
          data_dir: gr.BrowserState, visitor: gr.State, public: bool = False, allowed: bool = True) -> None:
    """Lay out the tab and wire its events; call inside ``page``'s context; ``data_dir`` from ``data_state()``,
    ``visitor`` from ``visitor_state()``."""
    if public and not allowed:
        gr.Markdown(DISABLED, elem_id="train-disabled")
        return
    job = gr.State("")
    with gr.Row():
        with gr.Column(scale=5):
            files = gr.File(label="Training images (PNG, JPEG, WebP), caption .txt files or a .zip",
                            file_count="multiple", type="filepath", height=140, elem_id="train-files")
            data_note = gr.Markdown("", elem_id="train-data-note")
            data_gallery = gr.Gallery(**SHOWN, label="Training images", columns=6, height=180, elem_id="train-gallery")
            captions = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], interactive=True,
                                    label="Captions (edit; saved beside each image as a .txt)",
                                    elem_id="train-captions")
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word", elem_id="train-trigger",
                                     info="a rare word for your concept (e.g. 'zkring'), added to captions that "
                                          "lack it; empty: the made-up word every caption shares")
                instance_prompt = gr.Textbox(label="Instance prompt", info="caption for images that have none")
            with gr.Accordion("Auto-caption", open=False, elem_id="train-autocaption"):
                with gr.Row(equal_height=True):
                    captioner = gr.Textbox(DEFAULT_CAPTIONER, label="Image-to-text model", interactive=not public,
                                           info="a transformers image-to-text model (Hub id or folder): from the "
                                                "local cache, or downloaded once when online",
                                           scale=3, elem_id="train-captioner")
                    overwrite = gr.Checkbox(False, label="Replace existing captions", scale=1)
                    caption_btn = gr.Button("Caption images", scale=1, elem_id="train-caption-btn")
            with gr.Row():
                method = gr.Dropdown([m.value for m in Method], value=Method.LORA.value, label="Method")
                model = gr.Dropdown(engine.model_choices(public), value=engine.startup_choice(public), label="Base model",
                                    allow_custom_value=not public)
                preset = gr.Dropdown([AUTO, *PRESETS], value=AUTO, label="Preset")
            preset_note = gr.Markdown(_preset_note(Method.LORA.value, engine.settings.model, AUTO),
                                      elem_id="train-preset-note")
            with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                advanced = _advanced_components()
            train_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
        with gr.Column(scale=6):
            status = gr.Markdown("No training job yet.", elem_id="train-status")
            plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss", height=220, elem_id="train-loss")
            samples = gr.Gallery(**SHOWN, label="Validation samples (fixed seeds)", columns=4, height=200,
                                 elem_id="train-samples")
            with gr.Row():
                stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume_btn = gr.Button("Resume", elem_id="train-resume")
                cancel_btn = gr.Button("Cancel", elem_id="train-cancel")
            with gr.Row():
                more = gr.Number(100, label="Steps to add", precision=0, scale=2)
                more_btn = gr.Button("Train N more steps", scale=1, elem_id="train-more")
            logs = gr.Textbox(label="Log", lines=6, max_lines=6, interactive=False, elem_id="train-log")
    gr.Markdown("### Training runs")
    runs = gr.Dataframe(headers=["job", "state", "method", "base", "steps", "final loss"], interactive=False,
                        elem_id="train-runs")
    with gr.Row():
        use_btn = gr.Button("Use in Generate", variant="primary", elem_id="train-use")
        zip_btn = gr.Button("Download (.zip)", elem_id="train-download")
        # A Space's visitors push into their own account, signed in with Hugging Face (hf_oauth in the README's
        # front matter); other public apps do not push at all.
        pushes = not public or bool(os.environ.get("SPACE_ID"))
        if public and pushes:
            gr.LoginButton(scale=1)
        repo = gr.Textbox(label="Hub repo", placeholder="your-name/my-lora", visible=pushes, scale=2)
        push_btn = gr.Button("Push to Hub (private)", visible=pushes)
    zip_file = gr.File(label="Download", interactive=False, elem_id="train-zip")
    result_note = gr.Markdown("", elem_id="train-result-note")

    adv_names = list(advanced)
    job_view = [job, status, plot, samples, logs, runs]

    def shown(staged) -> tuple:
        """(folder, note, gallery, caption rows) of a staged folder."""
        return str(staged.folder), staged.summary(), [str(p) for p in staged.images], [list(r) for r in staged.rows]

    def on_upload(paths: list[str] | None):
        if not paths:
            return "", "", [], []
        try:
            return shown(engine.stage_training_data(paths, public=public))
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def restore(folder: str):
        """A reload shows the data this browser staged last, while the server still has it."""
        if not folder:
            return (gr.skip(),) * 4
        try:
            return shown(engine.staged_data(folder))
        except ValueError:  # gone (or never ours): start empty
            return "", "", [], []

    def note_for(meth, base, *rest) -> str:
        try:
            return _preset_note(meth, engine.chosen_model(base, public), *rest)
        except ValueError as exc:
            return f"⚠️ {exc}"

    note_inputs = [method, model, preset, trigger, captions, instance_prompt]
    data_view = [data_dir, data_note, data_gallery, captions]
    files.upload(on_upload, files, data_view, api_visibility="private").then(
        note_for, note_inputs, preset_note, api_visibility="private")
    page.load(restore, data_dir, data_view, api_visibility="private").then(
        note_for, note_inputs, preset_note, api_visibility="private")

    def auto_caption(folder: str, table, model_id: str, trig: str, replace: bool):
        """Save the table's edits first (they are the user's), then caption; the trigger goes in front."""
        try:
            if not folder:
                raise ValueError("data: upload training images first")
            engine.save_captions(folder, _rows(table))
            staged, n = engine.auto_caption(folder, model_id, trig, replace, public=public)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return f"{n} caption(s) written by {model_id}. {staged.summary()}", [list(r) for r in staged.rows]

    caption_btn.click(auto_caption, [data_dir, captions, captioner, trigger, overwrite], [data_note, captions],
                      api_visibility="private").then(note_for, note_inputs, preset_note, api_visibility="private")

    def form_config(folder, table, trig, prompt, meth, base, pre, *adv):
        if not folder:
            raise ValueError("data: upload training images first")
        base = engine.chosen_model(base, public)
        engine.save_captions(folder, _rows(table))
        values = {"data": folder, "trigger": trig, "instance_prompt": prompt, "method": meth, "model": base,
                  "preset": None if pre == AUTO else pre, **_form_values(adv_names, list(adv))}
        return from_values(values)

    form = [data_dir, captions, trigger, instance_prompt, method, model, preset, *advanced.values(), visitor]

    def start(*values):
        try:
            job_id = engine.jobs.start(form_config(*values[:-1]), owner=values[-1])
            return _job_outputs(engine, job_id, public, values[-1])
        except ValueError as exc:
            raise UserError(str(exc)) from None

    started = train_btn.click(start, form, job_view, api_visibility="private")

    for trigger_event in (method.change, model.change, preset.change, trigger.blur, instance_prompt.blur,
                          captions.input):  # text boxes on blur, not at every keystroke
        trigger_event(note_for, note_inputs, preset_note, api_visibility="private")

    drawn = gr.State("")  # what the plot and the samples show now: unchanged ones are not sent again

    def refresh(job_id: str, drawn_key: str, who: str | None):
        # a reload re-attaches to this visitor's running job, else shows their newest
        job_id = job_id or engine.running_job(public, who) or next(iter(engine.visible_jobs(public, who)), "")
        if not job_id:
            return (gr.skip(),) * (len(job_view) + 1)
        out = _job_outputs(engine, job_id, public, who)
        key = f"{job_id}:{0 if out[2] is None else len(out[2])}:{out[3]}"
        if key == drawn_key:  # re-sending redraws the plot at every tick (it flickered) for nothing
            out = (*out[:2], gr.skip(), gr.skip(), *out[4:])
        return (*out, key)

    timer = gr.Timer(POLL_S)
    timer.tick(refresh, [job, drawn, visitor], [*job_view, drawn], api_visibility="private", concurrency_limit=None,
               show_progress="hidden")

    def control(action):
        """A handler for a button on the shown job: ``action(job_id, number)`` once the job is the visitor's."""
        def handler(job_id: str, who: str | None, n=None):
            try:
                action(engine.own_job(job_id, public, who), n)
                return _job_outputs(engine, job_id, public, who)
            except Exception as exc:
                raise user_error(exc) from None
        return handler

    stop_btn.click(control(lambda j, n: engine.jobs.stop(j)), [job, visitor], job_view, api_visibility="private")
    cancel_btn.click(control(lambda j, n: engine.jobs.cancel(j)), [job, visitor], job_view, api_visibility="private")
    resumed = resume_btn.click(control(lambda j, n: engine.jobs.resume(j)), [job, visitor], job_view,
                               api_visibility="private")
    more_steps = more_btn.click(control(lambda j, n: engine.jobs.resume(j, int(n or 0))), [job, visitor, more],
                                job_view, api_visibility="private")
    if zerogpu.active():  # the job trains in GPU slices of this visitor's requests, while the page is open
        slices = _slices(engine, public)
        for event in (started, resumed, more_steps):
            event.success(slices, [job, visitor], job_view, api_visibility="private", concurrency_limit=None,
                          show_progress="hidden")

    def select_run(table, who: str | None, evt: gr.SelectData):
        rows = table.values.tolist() if hasattr(table, "values") else table
        try:
            return _job_outputs(engine, rows[evt.index[0]][0], public, who)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    runs.select(select_run, [runs, visitor], job_view, api_visibility="private")

    def use(job_id: str, who: str | None, current: str):
        """An adapter joins the Generate tab's LoRA list at strength 1 (several stack); a full fine-tune is a model."""
        try:
            kind, source = engine.use_training_result(engine.own_job(job_id, public, who))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if kind == "model":
            return gr.skip(), gr.update(value=source), gr.Tabs(selected=generate_tab_id)
        return add_lora(current, job_id)[0], gr.skip(), gr.Tabs(selected=generate_tab_id)  # its name, no path

    use_btn.click(use, [job, visitor, gen.loras], [gen.loras, gen.model, tabs], api_visibility="private")

    def make_zip(job_id: str, who: str | None):
        try:
            return str(engine.jobs.zip_result(engine.own_job(job_id, public, who))), ""
        except ValueError as exc:
            raise UserError(str(exc)) from None

    zip_btn.click(make_zip, [job, visitor], [zip_file, result_note], api_visibility="private")

    def push(job_id: str, repo_id: str, profile: gr.OAuthProfile | None = None,
             oauth_token: gr.OAuthToken | None = None):
        login = (profile.username, oauth_token.token) if profile and oauth_token else None
        try:
            return f"Pushed to {engine.push_result(job_id, repo_id, public, login)} (private)"
        except ValueError as exc:
            raise UserError(str(exc)) from None

    push_btn.click(push, [job, repo], result_note, api_visibility="private")
