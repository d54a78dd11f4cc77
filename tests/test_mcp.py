"""--mcp (issue 18): an MCP client (the `mcp` package) lists the app's tools and draws an image through
its `generate` tool, on the embedded model: the answer is the image, and a link to the PNG whose stored parameters are
the call's (the image inline is re-encoded by gradio, without them)."""
from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from sd_demo.infotext import read_png
from tests.conftest import running_app

mcp = pytest.importorskip("mcp")


async def _session(url: str, work):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(url + "gradio_api/mcp/") as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)


def test_an_mcp_client_lists_the_tools_and_draws_an_image(tmp_path):
    async def work(session):
        tools = {t.name: t for t in (await session.list_tools()).tools}
        answer = await session.call_tool("generate", {"prompt": "a red circle on a blue background",
                                                           "steps": 8, "seed": 7, "fast": True})
        return tools, answer

    import httpx

    with running_app(["--model", "embedded", "--outputs", str(tmp_path), "--mcp"]) as (url, _):
        tools, answer = asyncio.run(_session(url, work))
        link = next(c.text for c in answer.content if c.type == "text").split("Image URL: ")[1].strip()
        served = httpx.get(link).content
    assert {"generate", "generate_gallery", "png_info"} <= set(tools)
    schema = tools["generate"].inputSchema["properties"]
    assert all(schema[name].get("description") for name in ("prompt", "steps", "width", "seed", "sampler", "fast"))
    assert not answer.isError, answer
    image = next(c for c in answer.content if c.type == "image")
    png = base64.b64decode(image.data)
    assert image.mimeType == "image/png" and Image.open(io.BytesIO(png)).size == (128, 128)  # the model's own size
    params = read_png(io.BytesIO(served))  # the PNG itself, as saved, with its parameters
    assert params.prompt == "a red circle on a blue background" and params.params["Seed"] == 7
    assert params.params["Steps"] == 8 and params.params["Deep cache"] == 3  # the Fast choice, as it ran


def test_without_the_flag_there_is_no_mcp_server(tmp_path):
    import httpx

    with running_app(["--model", "embedded", "--outputs", str(tmp_path)]) as (url, _):
        assert httpx.post(url + "gradio_api/mcp/", json={}).status_code == 404


def test_mcp_is_refused_beside_a_login():
    """gradio serves the MCP endpoint outside --auth's login: the two together would open the app's tools."""
    import app

    with pytest.raises(SystemExit) as exit_:
        app.parse_args(["--mcp", "--auth", "ann:pw"])
    assert exit_.value.code == 2
