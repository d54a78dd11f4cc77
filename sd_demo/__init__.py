"""sd_demo: a Stable Diffusion web app over diffusers components."""

__version__ = "0.1.0"


def setup_logging(level: int) -> None:
    """One log format for the app, the CLI and training jobs; Python warnings (skipped training files, library
    notices) become one log line each, not warnings.warn's file, line number and source line (which a training job's
    log in the browser showed as a path and a line of our code)."""
    import logging
    import warnings

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}"
    logging.captureWarnings(True)


def exit_on_sigterm() -> None:
    """SIGTERM (kill, systemd, a container stop, Cancel in the Train tab) unwinds like sys.exit: finally blocks and
    exit handlers run, so a zip extracted into a temp folder is deleted (the default action left it behind) and a
    checkpoint being written is removed, not left half-done."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
