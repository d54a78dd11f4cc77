"""sd_demo: a Stable Diffusion web app over diffusers components."""

__version__ = "0.1.0"
