"""sd_demo web app. Spaces runs this file; locally: ``python app.py [--model M] [--share] [--auth USER:PASS]``."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

import gradio as gr

from sd_demo import setup_logging
from sd_demo.__main__ import add_runtime_flags
from sd_demo.engine import IMAGE_FOLDERS, Engine, EngineSettings
from sd_demo.ui import generate as generate_tab
from sd_demo.ui import history as history_tab
from sd_demo.ui import img2img as img2img_tab
from sd_demo.ui import info as info_tab
from sd_demo.ui import mcp as mcp_tools
from sd_demo.ui import models as models_tab
from sd_demo.ui import sdapi
from sd_demo.ui import train as train_tab

log = logging.getLogger("sd_demo")
QUEUE_MAX = 20  # waiting jobs beyond this are refused with "queue full" instead of piling up
# how often gradio's queue looks for new events and for progress to send (see build_demo)
QUEUE_POLL_S, PROGRESS_POLL_S = 0.02, 0.1
# Largest single upload. Public: a PNG to read or a training image is a few MB, and public training data is capped
# at 200 MB unpacked anyway; private: the owner's dataset zip may hold hundreds of photos.
MAX_UPLOAD = {True: 50 * 2**20, False: 2 * 2**30}  # bytes
# Gradio's cache (uploads, and the copies of results it serves) otherwise grows forever: every hour, delete its
# files older than a day (a page open longer loses its previews; the PNGs stay in --outputs, which we never delete).
CACHE_SWEEP = (3600, 86400)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="sd_demo web app")
    add_runtime_flags(p)
    p.set_defaults(model=os.environ.get("SD_DEMO_MODEL", "embedded"))
    p.add_argument("--share", action="store_true", help="open a public gradio.live link (use --auth with it)")
    p.add_argument("--auth", default=os.environ.get("SD_DEMO_AUTH"), help="USER:PASS[,USER2:PASS2] required to log in")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1 or $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    p.add_argument("--outputs", default=os.environ.get("SD_DEMO_OUTPUTS", "outputs"),
                   help="folder for PNGs and training runs")
    p.add_argument("--allow-training", action="store_true", default=os.environ.get("SD_DEMO_ALLOW_TRAINING") == "1",
                   help="let visitors of a public app (share link without --auth, Space) train; uploads are capped")
    p.add_argument("--mcp", action="store_true", default=os.environ.get("SD_DEMO_MCP") == "1",
                   help="also serve the app as an MCP server (tools text_to_image, generate, png_info) at "
                        "/gradio_api/mcp/")
    args = p.parse_args(argv)
    if args.mcp and args.auth:  # gradio serves its MCP endpoint outside the login
        p.error("--mcp cannot be combined with --auth: the MCP endpoint does not check logins; run MCP on an app "
                "of its own without --auth (loopback only, or public with its public limits)")
    return args


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth: expected USER:PASS (several separated by commas)")
        pairs.append((user, password))
    return pairs


def bind_host(args: argparse.Namespace) -> str:
    """The address the server listens on: --host, else $GRADIO_SERVER_NAME, else loopback (gradio's own order)."""
    return args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:
        return False  # any other name may resolve to an interface other machines reach


def open_access(args: argparse.Namespace) -> str | None:
    """How strangers reach the app without logging in (a share link, a non-loopback bind), or None."""
    if args.auth:
        return None
    if args.share:
        return "a share link"
    host = bind_host(args)
    return None if is_loopback(host) else f"listening on {host}"


def is_public(args: argparse.Namespace) -> bool:
    """Open to strangers, or a Space: anyone can use it, so no custom model ids or local paths."""
    return bool(open_access(args) or os.environ.get("SPACE_ID"))


def build_demo(args: argparse.Namespace) -> gr.Blocks:
    engine = Engine(EngineSettings(args.model, args.device, args.dtype, args.attention, args.allow_pickle, args.outputs,
                                   args.compile))
    notice = ""
    try:
        engine.load()  # the start-up model is ready before the first click; a bad one is reported in the UI
    except ValueError as exc:
        log.error("%s", exc)
        notice = f"⚠️ {exc}. Pick or type a model above and press Load."
    public = is_public(args)
    with gr.Blocks(title="sd_demo", delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown("# sd_demo · Stable Diffusion")
        train_data, visitor = train_tab.data_state(), train_tab.visitor_state(demo)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                gen = generate_tab.build(engine, public=public, notice=notice,
                                         allow_loras=not public or args.allow_training, visitor=visitor)
            with gr.Tab("img2img", id="img2img"):
                img2img = img2img_tab.build(engine, gen, tabs, "img2img", public=public, visitor=visitor)
            with gr.Tab("Train", id="train"):
                train_tab.build(engine, gen, tabs, "generate", demo, train_data, visitor, public=public,
                                allowed=args.allow_training)
            with gr.Tab("Models", id="models"):
                models_tab.build(engine, gen, public=public)
            with gr.Tab("PNG Info", id="info"):
                info_tab.build(gen, tabs, "generate", engine, public=public, visitor=visitor, img2img=img2img)
            with gr.Tab("History", id="history"):
                history_tab.build(engine, gen, img2img, tabs, "generate", visitor, public=public)
        if args.mcp:
            mcp_tools.add_tools(engine, public)
    demo.queue(max_size=QUEUE_MAX, default_concurrency_limit=1)
    # Gradio's queue looks for new events every 1 ms and for progress every 10 ms, idle or not: on a 2-core CPU
    # those wake-ups took a fifth of the denoising threads' speed (BENCHMARKS.md, session 20). A new request now
    # waits at most QUEUE_POLL_S to start; pages show a step at most every 0.25 s (ui.generate.UPDATE_S) anyway.
    demo._queue.sleep_when_free, demo._queue.progress_update_sleep_when_free = QUEUE_POLL_S, PROGRESS_POLL_S
    demo.engine = engine  # for tests and scripts that drive the app in-process
    return demo


def launch(demo: gr.Blocks, args: argparse.Namespace, **kw):
    if access := open_access(args):
        log.warning("public app (%s without --auth): no custom model ids or local paths, training only with "
                    "--allow-training; add --auth USER:PASS to make it private", access)
    # Gradio hands out files from the working and temp folders (as cached copies) and, by path to anyone, from
    # allowed_paths: --outputs may be elsewhere, so its generated images are allowed, and nothing else under it
    # (staged uploads, training runs and their configs stay unreachable by URL).
    blocking = not kw.pop("prevent_thread_lock", False)
    served = demo.launch(server_name=bind_host(args), server_port=args.port, share=args.share,
                         auth=parse_auth(args.auth),
                         allowed_paths=[os.path.abspath(os.path.join(args.outputs, f)) for f in IMAGE_FOLDERS],
                         max_file_size=MAX_UPLOAD[is_public(args)], mcp_server=args.mcp, prevent_thread_lock=True,
                         **kw)
    # A1111's API beside gradio's (its server exists only now): tools written for A1111 drive the app directly
    sdapi.mount(demo.app, demo.engine, is_public(args), parse_auth(args.auth), MAX_UPLOAD[is_public(args)])
    if blocking:
        demo.block_thread()
    return served


# Spaces and `gradio app.py` import this module and look for `demo`; flags only apply when run as a script.
ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if __name__ == "__main__":
    try:
        parse_auth(ARGS.auth)  # a malformed --auth stops here, before the model load, never opens an open app
    except ValueError as exc:
        sys.exit(f"error: {exc}")
setup_logging(logging.INFO)
demo = build_demo(ARGS)

if __name__ == "__main__":
    launch(demo, ARGS)
