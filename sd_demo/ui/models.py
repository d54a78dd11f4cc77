"""The Models tab: search the Hub, download a model or a LoRA with a progress bar, list and clean the local cache."""
from __future__ import annotations

import contextvars
import datetime as _dt

import gradio as gr

from .. import hub
from ..engine import Engine
from .generate import GenerateTab, add_lora, said_on

_LABELS = {"model": "Text-to-image models", "lora": "LoRAs and embeddings", "downloads": "Most downloads",
           "likes": "Most likes", "trending_score": "Trending", "last_modified": "Recently updated"}
KIND_CHOICES = [(_LABELS[k], k) for k in hub.KINDS]  # (label, value): the values are hub's, which checks them
SORT_CHOICES = [(_LABELS[k], k) for k in hub.SORTS]
RESULT_HEADERS = ["Repo", "Downloads", "Likes", "Gated"]
CACHE_HEADERS = ["Repo", "Kind", "Size", "Last used"]


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else ""


def search_rows(engine: Engine, text: str, kind: str, sort: str, public: bool = False) -> tuple[list[list], str]:
    """(result rows, note) of a Hub search; offline or unreachable: no rows and the reason."""
    try:
        found = engine.search_hub(text, kind, sort, public)
    except ValueError as exc:
        return [], str(exc)
    note = f"{len(found)} repo(s)" + ("; click one to download it" if found and not public else "")
    return [[f.repo_id, f.downloads, f.likes, "yes" if f.gated else ""] for f in found], note


def cache_rows(engine: Engine) -> list[list]:
    return [[r.repo_id, r.kind, _size(r.size), _when(r.last_used)] for r in engine.cached_models()]


def progress_line(done: int, total: int, rate: float | None) -> str:
    speed = f" · {rate / 2**20:.1f} MB/s" if rate else ""
    return f"{_size(done)} of {_size(total)}{speed}"  # (gradio adds the percentage)


def download_progress(progress: gr.Progress):
    """An ``on_progress(done, total, rate)`` for Engine.download that moves the page's progress bar.
    huggingface_hub reports from its download threads, where gradio's per-event context (which event the progress
    belongs to) is unset and progress() would do nothing: each report runs in a copy of the caller's context."""
    event = contextvars.copy_context()

    def on_progress(done: int, total: int, rate: float | None) -> None:
        event.copy().run(progress, done / total, desc=progress_line(done, total, rate))

    return on_progress


def build(engine: Engine, gen: GenerateTab, public: bool = False) -> None:
    offline = hub.is_offline()
    notes = []
    if offline:
        notes.append("The Hub is offline (HF_HUB_OFFLINE): search and downloads are off; the cached models are "
                     "listed below.")
    if public:
        notes.append("This app is public: search only; downloads and the cache are the owner's (on a private app).")
    gr.Markdown(" ".join(notes) or "Search the Hub, download a model or a LoRA, and use it in the Generate tab.")
    with gr.Group(visible=not offline):
        with gr.Row():
            query = gr.Textbox(label="Search the Hub", placeholder="e.g. stable-diffusion, sdxl, anime", scale=3,
                               elem_id="hub-query")
            kind = gr.Dropdown(KIND_CHOICES, value="model", label="Look for", scale=2)
            sort = gr.Dropdown(SORT_CHOICES, value="downloads", label="Sort", scale=1)
            search_btn = gr.Button("Search", scale=1)
        results = gr.Dataframe(headers=RESULT_HEADERS, value=[], interactive=False, elem_id="hub-results")
        search_note = gr.Markdown("")
    with gr.Group(visible=not (offline or public)):
        with gr.Row():
            repo = gr.Textbox(label="Repo id (org/name, or org/name@revision)", scale=3, elem_id="download-repo")
            dl_kind = gr.Dropdown(KIND_CHOICES, value="model", label="It is", scale=2)
            dl_btn = gr.Button("Download", variant="primary", scale=1, elem_id="download-button")
        dl_note = gr.Markdown("", elem_id="download-note")
    # A public app does not show the owner's cache (private or gated repos may be in it).
    gr.Markdown("### On this machine", visible=not public)
    cache = gr.Dataframe(headers=CACHE_HEADERS, value=None if public else lambda: cache_rows(engine),
                         interactive=False, elem_id="cache-table", visible=not public)
    with gr.Row(visible=not public):
        refresh_btn = gr.Button("Refresh", scale=1)
        victim = gr.Textbox(label="Repo (click a row)", scale=3, elem_id="delete-repo")
        use_btn = gr.Button("Use in Generate", variant="primary", scale=1, elem_id="use-cached")
        delete_btn = gr.Button("Delete", variant="stop", scale=1, elem_id="delete-button")
    cache_note = gr.Markdown("")

    for trigger in (search_btn.click, query.submit):
        trigger(lambda t, k, s: search_rows(engine, t, k, s, public), [query, kind, sort], [results, search_note],
                api_visibility="private")

    def pick(kind_now: str, evt: gr.SelectData):
        row = evt.row_value or []
        return (row[0] if row else gr.skip()), kind_now

    results.select(pick, [kind], [repo, dl_kind], api_visibility="private")

    def download(spec: str, what: str, loras: str, progress=gr.Progress()):
        try:
            use = engine.download(spec, what, public, download_progress(progress))
        except ValueError as exc:
            return said_on(str(exc), 3)
        rows = cache_rows(engine)
        choices = gr.update(choices=engine.model_choices(public))
        if what == "model":
            return f"Downloaded {use}: pick it in the Generate tab's model list.", choices, gr.skip(), rows
        return (f"Downloaded {spec.strip()}: added to the Generate tab's LoRA list.", choices,
                add_lora(loras, use)[0], rows)

    dl_btn.click(download, [repo, dl_kind, gen.loras], [dl_note, gen.model, gen.loras, cache],
                 api_visibility="private", show_progress_on=dl_note)
    refresh_btn.click(lambda: cache_rows(engine), None, cache, api_visibility="private")

    def delete(repo_id: str):
        try:
            freed = engine.delete_cached((repo_id or "").strip(), public)
        except ValueError as exc:
            return said_on(str(exc), 2)
        return f"Deleted {repo_id.strip()}: {_size(freed)} freed.", cache_rows(engine), \
            gr.update(choices=engine.model_choices(public))

    delete_btn.click(delete, victim, [cache_note, cache, gen.model], api_visibility="private")

    def use(repo_id: str, loras: str):
        try:
            kind, source = engine.use_cached((repo_id or "").strip(), public)
        except ValueError as exc:
            return said_on(str(exc), 2)
        if kind == "model":
            return (f"`{source}` is in the Generate tab's model box.",
                    gr.update(choices=engine.model_choices(public), value=source), gr.skip())
        return f"`{repo_id.strip()}` is in the Generate tab's LoRA list.", gr.skip(), add_lora(loras, source)[0]

    use_btn.click(use, [victim, gen.loras], [cache_note, gen.model, gen.loras], api_visibility="private")

    def pick_cached(evt: gr.SelectData):
        return (evt.row_value or [""])[0]

    cache.select(pick_cached, None, victim, api_visibility="private")
