"""Tools for LLM clients (`--mcp`): Gradio's MCP server offers every public endpoint; this adds the ``generate``
tool (HTTP API: /text_to_image), whose answer an MCP client shows as an image (the Generate tab's own endpoint,
the tool ``generate_gallery``, answers with a gallery, which reaches a client only as text)."""
# No `from __future__ import annotations`: gr.api reads the type hints as objects. One output: gradio 6.31's MCP
# server hands a queued tool's several outputs to the client as one text.
import gradio as gr
from gradio.data_classes import FileData

from ..engine import Engine
from ..generate import GenerationParams
from .generate import RUN, on_gpu, user_error


def add_tools(engine: Engine, public: bool) -> None:
    """Register the tools in the Blocks being built."""

    def generate(prompt: str, negative_prompt: str = "", steps: int = 0, width: int = 0, height: int = 0,
                      guidance_scale: float = 0.0, sampler: str = "", seed: int = -1,
                      model: str = "", fast: bool = False) -> FileData:
        """Draw one image from a text prompt with the app's Stable Diffusion model; returns the PNG, which holds
        its generation parameters (A1111's "parameters" text: prompt, steps, sampler, CFG scale, seed, size, model).

        Args:
            prompt: What the image shows, in plain words (e.g. "a red circle on a blue background").
            negative_prompt: What the image should not show; empty for nothing.
            steps: Denoising steps, 1 to 150; 0 for the model's recommended count (more is slower, finer).
            width: Width in pixels, a multiple of 8 from 64 to 2048; 0 for the model's own size.
            height: Height in pixels, a multiple of 8 from 64 to 2048; 0 for the model's own size.
            guidance_scale: How strictly the prompt is followed (classifier-free guidance, 1 to 30); 0 for the
                model's recommended value.
            sampler: An A1111 sampler name such as "Euler a" or "DPM++ 2M"; empty for the model's recommended one.
            seed: The random seed; the same seed and settings give the same image. -1 for a random seed.
            model: The model to use (a name from the app's model list); empty for the loaded model.
            fast: 2-4x faster for a little less detail (the Generate tab's Fast: Deep cache, CFG cutoff and,
                where it pays, bf16 autocast): drafts, many variations.
        """
        try:
            params = GenerationParams(prompt=prompt or "", negative_prompt=negative_prompt or "",
                                      steps=steps or None, width=width or None,
                                      height=height or None, guidance_scale=guidance_scale or None,
                                      sampler=sampler or None, seed=seed, batch_size=1, fast=fast).validate()
            # as the Generate tab runs: waits while training holds the GPU; the result is the last update
            *_, done = engine.run(params, model=engine.chosen_model(model or None, public), job="mcp")
            if not done.paths:
                raise ValueError("text_to_image: the job was cancelled before it started")
        except Exception as exc:
            raise user_error(exc) from None
        return FileData(path=str(done.paths[0]), mime_type="image/png")

    # through the engine's queue, with the Generate tab's runs (RUN's concurrency)
    gr.api(on_gpu(engine, public, generate), api_name="text_to_image", concurrency_id=RUN["concurrency_id"],
           concurrency_limit=RUN["concurrency_limit"])
