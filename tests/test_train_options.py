"""Training options that change what is learned, each checked where it acts: the loss target follows the model's
prediction type, min-SNR weights, noise offset, caption dropout, latent and text caching (the VAE and a frozen text
encoder never run in the loop), warm-up on every schedule, keep-last-K checkpoints, the optimizer choice, and the
progress events."""
import sys
import types

import pytest
import torch
from PIL import Image

from sd_demo.train import loop
from sd_demo.train.config import TrainConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt_data")
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 200, 30)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"a green square {i}")
    return d


def config(model, data, out, **kw):
    base = dict(method="lora", model=str(model), data=str(data), out=str(out), steps=6, resolution=64, batch=2,
                rank=4, alpha=4.0, lr=1e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _scheduler(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_follows_the_prediction_type(prediction_type):
    sched = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    v = sched.get_velocity(lat, noise, t)
    right, wrong = (noise, v) if prediction_type == "epsilon" else (v, noise)
    for gamma in (0.0, 5.0):
        assert loop.loss_fn(right, noise, lat, t, sched, gamma).item() < 1e-12
        assert loop.loss_fn(wrong, noise, lat, t, sched, gamma).item() > 0.01


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_by_min_snr_gamma(prediction_type):
    """Hang et al. 2023: weight min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v. Every sample here has squared
    error 1, so the loss is the mean weight."""
    sched = _scheduler(prediction_type)
    t = torch.tensor([5, 100, 400, 950])
    ac = sched.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    want = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    lat, noise = torch.zeros(4, 4, 8, 8), torch.zeros(4, 4, 8, 8)  # v target = -sqrt(1 - ac) * 0 = 0 too
    pred = torch.ones(4, 4, 8, 8)
    for i in range(4):  # one sample at a time: its own weight
        got = loop.loss_fn(pred[i:i + 1], noise[i:i + 1], lat[i:i + 1], t[i:i + 1], sched, 5.0).item()
        assert got == pytest.approx(want[i].item(), rel=1e-4)
    if prediction_type == "epsilon":  # low-noise steps are down-weighted, high-noise ones barely
        assert want[0] < 0.1 and want[-1] > 0.9


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_cap_weighting_keeps_high_noise_steps(prediction_type):
    """snr_weighting 'cap': min(1, γ / (SNR + 1)) on v, so high-noise steps weigh fully where min-snr fades them
    out; on ε it is min-snr itself."""
    sched = _scheduler(prediction_type)
    t = torch.tensor([5, 100, 400, 950])
    ac = sched.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    if prediction_type == "epsilon":
        want = torch.minimum(snr, torch.tensor(5.0)) / snr
    else:
        want = torch.clamp(5.0 / (snr + 1), max=1.0)
    lat, noise, pred = torch.zeros(4, 4, 8, 8), torch.zeros(4, 4, 8, 8), torch.ones(4, 4, 8, 8)
    got = [loop.loss_fn(pred[i:i + 1], noise[i:i + 1], lat[i:i + 1], t[i:i + 1], sched, 5.0, "cap").item()
           for i in range(4)]
    assert got == pytest.approx(want.tolist(), rel=1e-4)
    assert got[0] < 0.1 and got[-1] > 0.99  # the lowest-noise step down-weighted, the highest-noise one whole


def _spy_run(tiny_model_dirs, data_dir, out, **kw):
    """Train with spies on the VAE encoder, the text encoder, the captions the loop asks for and the noise it adds."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    seen = {"encode": 0, "text": 0, "captions": [], "noise": []}
    real_encode, real_text, real_loss = AutoencoderKL.encode, CLIPTextModel.forward, loop.loss_fn
    real_call = loop.TextEncoderCache.__call__

    def encode(self, *a, **k):
        seen["encode"] += 1
        return real_encode(self, *a, **k)

    def text(self, *a, **k):
        seen["text"] += 1
        return real_text(self, *a, **k)

    def call(self, captions):
        seen["captions"] += list(captions)
        return real_call(self, captions)

    def loss(pred, noise, *a, **k):
        seen["noise"].append(noise.detach().clone())
        return real_loss(pred, noise, *a, **k)

    events = []
    with pytest.MonkeyPatch.context() as m:  # undone after each run, so spies never wrap spies
        m.setattr(AutoencoderKL, "encode", encode)
        m.setattr(CLIPTextModel, "forward", text)
        m.setattr(loop.TextEncoderCache, "__call__", call)
        m.setattr(loop, "loss_fn", loss)
        result = loop.train(config(tiny_model_dirs["sd15"], data_dir, out, **kw), on_event=events.append)
    return seen, events, result


def test_latents_and_frozen_text_are_computed_once(tiny_model_dirs, data_dir, tmp_path):
    """12 steps of batch 2 with flips see 24 samples; the VAE encodes each image once per orientation (8 calls),
    the frozen text encoder each distinct caption once, and caption dropout empties about its share of captions."""
    seen, _, _ = _spy_run(tiny_model_dirs, data_dir, tmp_path, steps=12, random_flip=True,
                          caption_dropout=0.5)
    assert seen["encode"] == 4 * 2
    assert len(seen["captions"]) == 24
    assert seen["text"] == len(set(seen["captions"])) <= 5  # 4 captions + the empty one
    assert 6 <= seen["captions"].count("") <= 18
    # With the text encoder training, nothing is cached: it runs every step.
    seen, _, _ = _spy_run(tiny_model_dirs, data_dir, tmp_path / "te", steps=3, train_text_encoder=True)
    assert seen["text"] >= 3 and "" not in seen["captions"]


def test_noise_offset_shifts_each_channel_mean(tiny_model_dirs, data_dir, tmp_path):
    def channel_mean_spread(noises):  # std over samples and channels of each channel's spatial mean
        return torch.cat([n.mean(dim=(2, 3)).flatten() for n in noises]).std().item()

    plain, _, _ = _spy_run(tiny_model_dirs, data_dir, tmp_path / "a", steps=8)
    offset, _, _ = _spy_run(tiny_model_dirs, data_dir, tmp_path / "b", steps=8, noise_offset=0.5)
    # 8x8 latents: plain noise's channel means spread ~1/8; an offset of 0.5 adds a spread of 0.5.
    assert channel_mean_spread(plain["noise"]) < 0.25 < channel_mean_spread(offset["noise"])


def test_progress_events_and_warmup_on_the_constant_schedule(tiny_model_dirs, data_dir, tmp_path):
    _, events, result = _spy_run(tiny_model_dirs, data_dir, tmp_path, steps=4, lr=1e-3,
                                 lr_schedule="constant", warmup_steps=2)
    notes = [e.message for e in events if e.message]  # the preset, the memory and the time estimates
    assert notes[0].startswith("preset sd1-lora-cpu:") and notes[1].startswith("memory: about")
    assert "estimate:" in notes[2] and "remaining of 4 steps" in notes[2]
    events = [e for e in events if not e.message]
    assert [e.step for e in events] == [1, 2, 3, 4] and all(e.total == 4 for e in events)
    assert [e.loss for e in events] == pytest.approx(result.losses)
    # The LR in effect for the next step: half-way up the warm-up, then constant.
    assert [e.lr for e in events] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert all(e.sec_per_step > 0 for e in events) and events[-1].eta_sec == 0
    assert events[0].eta_sec == pytest.approx(3 * events[0].sec_per_step)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    from sd_demo.train import checkpoint

    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (2, 4, 6):
        w.grad = torch.ones(3)
        opt.step()
        checkpoint.save_checkpoint(tmp_path, step, {"w": w.detach()}, opt, sched, {}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    weights, opt_state, meta = checkpoint.load_checkpoint(tmp_path / "step-000006")
    assert meta["step"] == 6 and torch.equal(weights["w"], w.detach())
    assert opt_state["state"][0]["step"].item() == 3


@pytest.mark.parametrize("method,decay", [("lora", 1e-2), ("textual-inversion", 0.0)])
def test_8bit_adamw_on_cuda_when_bitsandbytes_is_there(monkeypatch, method, decay):
    made = {}

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.update(kw)
            super().__init__(params, **kw)

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(
        AdamW8bit=AdamW8bit)))
    cfg = TrainConfig(method=method, lr=3e-4)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(loop.make_optimizer(params, cfg, "cuda")) is AdamW8bit
    assert made == {"lr": 3e-4, "weight_decay": decay}
    cpu = loop.make_optimizer(params, cfg, "cpu")
    assert type(cpu) is torch.optim.AdamW and cpu.param_groups[0]["weight_decay"] == decay
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: plain AdamW on CUDA too
    assert type(loop.make_optimizer(params, cfg, "cuda")) is torch.optim.AdamW


def test_lr_schedules_all_warm_up():
    from diffusers.optimization import get_scheduler

    for name in ("constant", "cosine", "linear"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        cfg = TrainConfig(lr_schedule=name, warmup_steps=4, steps=100)
        sched = get_scheduler(loop.lr_schedule_name(cfg), opt, num_warmup_steps=4, num_training_steps=100)
        lrs = []
        for _ in range(6):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert lrs[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0], abs=1e-3), name


def test_text_encoder_lr_trains_the_text_encoder_at_its_own_rate(tiny_model_dirs, data_dir, tmp_path):
    """--text-encoder-lr: the text encoder's LoRA moves at its rate (here ~nothing), the UNet's at --lr."""
    from safetensors.torch import load_file

    from sd_demo.__main__ import main

    assert main(["train", "--model", str(tiny_model_dirs["sd15"]), "--data", str(data_dir), "--out", str(tmp_path),
                 "--steps", "3", "--resolution", "64", "--lr", "1e-2", "--train-text-encoder",
                 "--text-encoder-lr", "1e-12"]) == 0
    weights = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    moved = {part: max(w.abs().max().item() for k, w in weights.items() if k.startswith(part) and ".up." in k)
             for part in ("unet.", "text_encoder.")}
    assert moved["unet."] > 1e-3 and moved["text_encoder."] < 1e-8  # "up" (B) starts at 0: its size is the update
    with pytest.raises(ValueError, match="text_encoder_lr: 0.0 must be > 0"):
        config(tiny_model_dirs["sd15"], data_dir, tmp_path, text_encoder_lr=0.0).validate()
