"""The History tab: this visitor's finished jobs (a private app: every job), newest first, kept in the outputs
folder by sd_demo.runqueue (a page reload or a restart keeps them): look at one, re-run it, send it to Generate or
img2img. Only widgets and wiring."""
from __future__ import annotations

import gradio as gr

from .. import zerogpu
from ..engine import Engine
from .generate import SHOWN, GenerateTab, UserError, owner_of, session_of
from .img2img import Img2imgTab
from .info import wire_send_to_generate

MAX_ITEMS = 240  # images the gallery holds (the newest jobs' first)
REFRESH_S = 2.0  # how often an open page looks for newly finished jobs


def history_items(engine: Engine, owner: str, public: bool) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """Gallery items (file, caption) and, per item, [entry id, file, parameters]."""
    items, refs = [], []
    for entry in engine.history(owner, public):
        texts = entry.infotexts + [""] * (len(entry.paths) - len(entry.infotexts))
        for path, text in zip(entry.paths, texts):
            items.append((path, f"{entry.kind} · {entry.label[:60] or '(no prompt)'}"))
            refs.append([entry.id, path, text])
    return items[:MAX_ITEMS], refs[:MAX_ITEMS]


def build(engine: Engine, gen: GenerateTab, img2img: Img2imgTab, tabs: gr.Tabs, generate_tab_id: str,
          visitor: gr.State, public: bool = False) -> None:
    """Lay out the tab and wire its events; call inside gr.Blocks."""
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(**SHOWN, label="Finished jobs, newest first", columns=4, height=560, format="png",
                                 elem_id="history-gallery")
        with gr.Column(scale=2):
            text = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="history-info")
            with gr.Row():
                rerun = gr.Button("Re-run", variant="primary", elem_id="history-rerun", visible=not zerogpu.active())
                to_generate = gr.Button("Send to Generate", elem_id="history-generate")
                to_img2img = gr.Button("Send to img2img", elem_id="history-img2img")
            note = gr.Markdown("", elem_id="history-note")
            picked_path = gr.State("")  # the picked image's file, for "Send to Generate" (server-side: a visitor
            # cannot point it at another file of this machine)
            wire_send_to_generate(engine, public, generate_tab_id, gen, tabs, to_generate, picked_path, visitor,
                                  "history")
    refs = gr.State([])  # per gallery item: [entry id, file, parameters]
    picked = gr.State(None)  # the picked item's ref
    shown = gr.State(None)  # {"stamp": the history file's, "refs": the gallery's} when it was filled

    def refresh_history(who: str | None, last: dict | None, request: gr.Request):
        stamp = engine.queue.stamp()
        if last and last["stamp"] == stamp:
            return gr.skip(), gr.skip(), gr.skip()
        items, item_refs = history_items(engine, owner_of(who, request), public)
        if last and last["refs"] == item_refs:  # another visitor's job: nothing new here
            return gr.skip(), gr.skip(), {"stamp": stamp, "refs": item_refs}
        return items, item_refs, {"stamp": stamp, "refs": item_refs}

    def pick(item_refs: list, evt: gr.SelectData):
        ref = item_refs[evt.index] if 0 <= evt.index < len(item_refs) else None
        return (ref[2], ref, ref[1]) if ref else ("", None, "")

    def again(ref, who: str | None, request: gr.Request):
        if not ref:
            raise UserError("history: pick an image first")
        if zerogpu.active():  # (the button is hidden there; a crafted request gets this line)
            raise UserError("re-run: not on ZeroGPU; send it to Generate instead")
        try:
            job = engine.rerun(ref[0], owner_of(who, request), session_of(request), public)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return (f"Queued again ({engine.queue_note(job) or 'starting now'}); see the Queue on the Generate tab. "
                "Its images come here.")

    quick = dict(api_visibility="private", queue=False)
    gr.Timer(REFRESH_S).tick(refresh_history, [visitor, shown], [gallery, refs, shown], **quick)
    gallery.select(pick, refs, [text, picked, picked_path], **quick)
    rerun.click(again, [picked, visitor], note, **quick)
    to_img2img.click(lambda ref: img2img.values(ref[1], ref[2]) if ref else img2img.values(None, None), picked,
                     img2img.targets, api_visibility="private")
