"""X/Y/Z plot (issue 20): axes parsed as A1111 writes them, every cell equal to the single image of its parameters."""
import numpy as np
import pytest
from PIL import Image

from sd_demo import xyz
from sd_demo.engine import Engine, EngineSettings
from sd_demo.generate import GenerationParams
from sd_demo.infotext import read_png


def test_axis_values_lists_and_ranges():
    assert xyz.parse_axis("Steps", "1-5").values == (1, 2, 3, 4, 5)
    assert xyz.parse_axis("Steps", "10-30 (+10)").values == (10, 20, 30)
    assert xyz.parse_axis("CFG scale", "1-2 [5]").values == (1.0, 1.25, 1.5, 1.75, 2.0)
    assert xyz.parse_axis("Seed", "-1, 7").values == (-1, 7)
    assert xyz.parse_axis("Prompt S/R", 'red, "green, bright", blue').values == ("red", "green, bright", "blue")
    for name, text, msg in [("Steps", "3.5", "not a int"), ("Sampler", "Euler a, Nope", "'Nope' is unknown"),
                            ("Steps", "1-500", "at most 64 cells"), ("Steps", "5-1 (+1)", "never reaches"),
                            ("Colour", "1", "unknown axis"), ("Steps", " , ", "has no values")]:
        with pytest.raises(ValueError, match=msg):
            xyz.parse_axis(name, text)


def test_prompt_sr_and_lora_scale_need_what_they_change():
    p = GenerationParams(prompt="a red circle", seed=3)
    with pytest.raises(ValueError, match="'blue' is not in the prompt"):
        xyz.cells(p, [xyz.parse_axis("Prompt S/R", "blue, green")], None, [])
    with pytest.raises(ValueError, match="LoRA scale needs a LoRA"):
        xyz.cells(p, [xyz.parse_axis("LoRA scale", "0.5, 1")], None, [])
    cells = xyz.cells(p, [xyz.parse_axis("Prompt S/R", "red, green"), xyz.parse_axis("Seed", "1, 2")], None, [])
    assert [(c.params.prompt, c.params.seed) for c in cells] == [
        ("a red circle", 1), ("a green circle", 1), ("a red circle", 2), ("a green circle", 2)]


def test_a_two_by_three_plot_equals_single_generations(tiny_model_dirs, tmp_path):
    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    params = GenerationParams(prompt="a red square", steps=3, seed=11, sampler="Euler")
    updates = list(engine.run(params, axes=[("CFG scale", "2, 5, 8"), ("Sampler", "Euler, DDIM")]))
    steps = [u.step for u in updates if u.step]
    assert (steps[-1].step, steps[-1].total) == (18, 18)  # one progress over the six cells
    result, paths = updates[-1].result, updates[-1].paths
    assert len(result.images) == 7 and "txt2img-grids" in str(paths[0])
    cells = result.images[1:]
    for k, (sampler, cfg) in enumerate((s, c) for s in ("Euler", "DDIM") for c in (2.0, 5.0, 8.0)):
        single, _ = engine.generate(GenerationParams(prompt="a red square", steps=3, seed=11, sampler=sampler,
                                                     guidance_scale=cfg), save=False)
        assert np.array_equal(np.asarray(single.images[0]), np.asarray(cells[k])), (sampler, cfg)
        info = read_png(paths[1 + k]).params
        assert (info["Sampler"], info["CFG scale"], info["Seed"]) == (sampler, cfg, 11)
    grid = Image.open(paths[0])
    w, h = cells[0].size
    assert grid.width > 3 * w and grid.height > 2 * h  # the cells plus their labels
    # the grid holds the cells where their labels say: top-left Euler / CFG 2, bottom-right DDIM / CFG 8
    corner = np.asarray(grid)[-h:, -w:]
    assert np.array_equal(corner, np.asarray(cells[5]))


def test_a_checkpoint_axis_loads_each_model_once(tiny_model_dirs, tmp_path):
    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    loads = []
    real = engine.load

    def counting(spec=None, tqdm_class=None):
        loads.append(spec)
        return real(spec, tqdm_class)

    engine.load = counting
    a, b = str(tiny_model_dirs["sd15"]), str(tiny_model_dirs["sd2v"])
    updates = list(engine.run(GenerationParams(prompt="x", steps=2, seed=1),
                              axes=[("Seed", "1, 2, 3"), ("Checkpoint", f"{a}, {b}")]))
    models = [read_png(p).params["Model"] for p in updates[-1].paths[1:]]
    assert models == [models[0]] * 3 + [models[3]] * 3 and models[0] != models[3]
    switches = sum(1 for x, y in zip(loads, loads[1:]) if x != y)
    assert switches == 1  # sd15 for its three cells, then sd2v for its three
