"""The embedded model's world: seeded shapes scenes, their captions, and a pixel-analysis judge of prompt adherence.

    from sd_demo.shapes import sample_scenes, render, caption, parse_prompt, evaluate
"""
from .captions import CaptionStyle, caption, parse_prompt, random_caption
from .evaluate import (NO_OBJECT, AttributeResult, Detection, EvalResult, Report, detect, evaluate, evaluate_set,
                       format_table, judge)
from .vocab import ATTRIBUTES, PALETTE, Color, Position, PromptSpec, Shape, Size
from .world import (DEFAULT_CONFIG, Obj, Scene, Split, WorldConfig, all_combinations, is_held_out, make_scene,
                    render, sample_scenes, triples)

__all__ = [
    "ATTRIBUTES", "PALETTE", "Color", "Position", "PromptSpec", "Shape", "Size",
    "CaptionStyle", "caption", "parse_prompt", "random_caption",
    "DEFAULT_CONFIG", "Obj", "Scene", "Split", "WorldConfig", "all_combinations", "is_held_out", "make_scene",
    "render", "sample_scenes", "triples",
    "NO_OBJECT", "AttributeResult", "Detection", "EvalResult", "Report", "detect", "evaluate", "evaluate_set",
    "format_table", "judge",
]
