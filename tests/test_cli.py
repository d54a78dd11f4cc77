"""`python -m sd_demo generate`: PNGs with infotext, no overwriting, one-line errors with a non-zero exit."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sd_demo.__main__ import main
from sd_demo.infotext import read_png


def test_generate_writes_png_with_infotext(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "cat.png"
    rc = main(["generate", "--model", str(tiny_model_dirs["sd2v"]), "--prompt", "a cat", "--negative-prompt", "dog",
               "--steps", "3", "--seed", "11", "--sampler", "Euler a", "--guidance", "5", "--out", str(out)])
    assert rc == 0 and out.exists()
    info = read_png(out)
    assert (info.prompt, info.negative_prompt) == ("a cat", "dog")
    assert {k: info.params[k] for k in ("Steps", "Sampler", "CFG scale", "Seed")} == {
        "Steps": 3, "Sampler": "Euler a", "CFG scale": 5, "Seed": 11}
    assert "(seed 11)" in capsys.readouterr().out


def test_batch_into_folder_and_cli_matches_library(tiny_model_dirs, tmp_path, loaded_models):
    from sd_demo.generate import GenerationParams, generate

    rc = main(["generate", "--model", str(tiny_model_dirs["sd15"]), "--prompt", "a red star", "--steps", "2",
               "--seed", "3", "--batch", "2", "--out", str(tmp_path / "runs")])
    files = sorted((tmp_path / "runs").glob("*.png"))
    assert rc == 0 and [f.name for f in files] == ["00000-3.png", "00001-4.png"]
    lib = generate(loaded_models["sd15"], GenerationParams(prompt="a red star", steps=2, seed=4)).images[0]
    assert np.abs(np.asarray(Image.open(files[1]), dtype=int) - np.asarray(lib, dtype=int)).max() <= 2


def test_refuses_to_overwrite(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"user data")
    rc = main(["generate", "--model", str(tiny_model_dirs["sd15"]), "--prompt", "x", "--steps", "1", "--out", str(out)])
    assert rc == 2 and out.read_bytes() == b"user data"
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--width", "100"], "width: 100 px"),
    (["--steps", "0"], "steps: 0"),
    (["--batch", "9"], "batch_size: 9"),
    (["--guidance", "-2"], "guidance_scale: -2"),
    (["--model", "nobody/nothing"], "unknown model 'nobody/nothing'"),
    (["--model", "a" * 5000], "model: 5000 characters is too long"),
    (["--model", "/"], "model '/' is not a diffusers model folder"),
])
def test_bad_input_one_line_nonzero(tiny_model_dirs, tmp_path, capsys, args, needle):
    rc = main(["generate", "--model", str(tiny_model_dirs["sd15"]), "--prompt", "x", "--steps", "2",
               "--out", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (tmp_path / "x.png").exists()


def test_process_exit_status_and_single_line(tmp_path):
    """The real process: status 2, one 'error:' line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "sd_demo", "generate", "--model", "nobody/nothing", "--prompt", "x",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "error: unknown model 'nobody/nothing': not in the local Hugging Face cache and the Hub is offline "
        "(download it once with network, or pass a local folder)"]


def test_unknown_sampler_rejected_by_parser(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sd_demo", "generate", "--prompt", "x", "--sampler", "Nope",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'Nope'" in proc.stderr


def test_a_truncated_text_encoder_is_one_line(tiny_model_dirs, tmp_path, capsys):
    """A cut download or copy: the raw SafetensorError traceback became one line naming the component."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dirs["sd15"], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc = main(["generate", "--model", str(folder), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: model '{folder}': text_encoder could not be loaded (")


def test_generate_from_an_init_image_and_a_mask(tiny_model_dirs, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from sd_demo.infotext import read_png

    src, mask, out = tmp_path / "src.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 32, 64, 64))
    m.save(mask)
    rc = main(["generate", "--model", str(tiny_model_dirs["sd15"]), "--prompt", "a red star", "--steps", "3",
               "--init-image", str(src), "--mask", str(mask), "--strength", "0.6", "--out", str(out)])
    assert rc == 0
    assert (np.asarray(Image.open(out).convert("RGB"))[:20] == np.asarray(Image.open(src))[:20]).all()
    assert read_png(out).params["Denoising strength"] == 0.6
    (tmp_path / "notes.png").write_text("not a picture")
    rc = main(["generate", "--model", str(tiny_model_dirs["sd15"]), "--prompt", "x", "--init-image",
               str(tmp_path / "notes.png"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --init-image:" in err and "is not a readable image" in err
    assert not (tmp_path / "x.png").exists()


def test_prompts_file_makes_one_image_set_per_line(tiny_model_dirs, tmp_path, capsys):
    from sd_demo.infotext import read_png

    jobs = tmp_path / "jobs.txt"
    jobs.write_text('a red star\n\n--prompt "a blue cat" --negative_prompt "dog" --cfg_scale 4 --steps 3 --seed 9\n'
                    "--prompt 'two' --batch 2 --seed 20 --sampler_name Euler\n")
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_model_dirs["sd15"]), "--steps", "2", "--seed", "1",
               "--prompts-file", str(jobs), "--out", str(out)])
    assert rc == 0
    infos = sorted((read_png(p) for p in out.glob("*.png")), key=lambda i: i.params["Seed"])
    assert [(i.prompt, i.params["Seed"], i.params["Steps"]) for i in infos] == [
        ("a red star", 1, 2), ("a blue cat", 9, 3), ("two", 20, 2), ("two", 21, 2)]
    assert infos[1].negative_prompt == "dog" and infos[1].params["CFG scale"] == 4
    assert infos[2].params["Sampler"] == "Euler"
    jobs.write_text("a red star\n--prompt x --steps 0\n")
    rc = main(["generate", "--model", str(tiny_model_dirs["sd15"]), "--prompts-file", str(jobs), "--out",
               str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --prompts-file: line 2: steps: 0 is out of range" in err
    assert not (tmp_path / "bad").exists()  # a bad line is found before any image is made
