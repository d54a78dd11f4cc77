"""Command-line flags generated from config dataclasses, so each option is declared once (its field)."""
from __future__ import annotations

import argparse


def add_field_flags(parser: argparse.ArgumentParser, field_list, none_type=str) -> None:
    """One flag per config-dataclass field (name, default, metadata): --negative-prompt, --steps, --rank, ...

    Booleans become --x / --no-x switches; tuples take one or more values of their items' type; a field whose
    default is None takes ``none_type`` values. Metadata may give "help", "choices", "flag" and "type".
    """
    for name, default, meta in field_list:
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        help_text = meta.get("help", "")
        if isinstance(default, bool) or meta.get("type") is bool:  # a None default: unset, from a preset
            # --x / --no-x, so a field that defaults to True (--center-crop) can be turned off too
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, dest=name,
                                help=help_text)
            continue
        kw = {"default": default, "help": f"{help_text} (default: {default})".strip(), "dest": name}
        if isinstance(default, tuple):
            kw.update(type=type(default[0]), nargs="+")
        else:
            kw["type"] = meta.get("type") or (type(default) if default is not None else none_type)
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        parser.add_argument(flag, **kw)


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """``--compile [torch|openvino]``, for the app, the CLI and the evaluator."""
    from .models import COMPILERS
    from .openvino_blocks import INSTALL

    parser.add_argument("--compile", nargs="?", const="torch", default="", choices=COMPILERS,
                        help="the same images, faster after a warm-up: 'torch' (the default of a bare --compile): "
                             "torch.compile the UNet and VAE decoder, once per new size or batch (tens of seconds on "
                             "a CPU); 'openvino': OpenVINO runs the blocks of the UNet and VAE decoder on a CPU, "
                             f"converted on the first image (`{INSTALL}`). A LoRA change compiles again. Compiled "
                             "graphs run in fp32: Fast goes without bf16 autocast")
