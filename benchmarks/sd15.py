"""Models with SD 1.5's and SDXL's architectures and random weights, for timings that need no Hub download."""
from __future__ import annotations

from pathlib import Path


def build_sd15(folder: Path, device: str = "cpu") -> str:
    """SD 1.5's architecture (UNet 860 M, VAE 84 M, CLIP ViT-L/14 text encoder 123 M) with random weights, saved in
    fp16 in diffusers layout (loaders upcast as they need), with a random TAESD (AutoencoderTiny's defaults) as its
    tiny VAE. The tokenizer is the tests' small CLIP BPE: vocabulary size hardly affects speed."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_models import make_clip_tokenizer

    tok = make_clip_tokenizer(folder / "tokenizer_src")
    n = len(tok)
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1 B parameters is much faster on a GPU
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x's
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512, scaling_factor=0.18215, force_upcast=True)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                          hidden_act="quick_gelu", bos_token_id=n - 2, eos_token_id=n - 1,
                                          pad_token_id=tok.pad_token_id))
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder / "sd15")
    from sd_demo.models import TINY_VAE_DIR

    AutoencoderTiny().to(torch.float16).save_pretrained(folder / "sd15" / TINY_VAE_DIR)  # TAESD's architecture
    return str(folder / "sd15")


def build_sdxl(folder: Path, device: str = "cpu") -> str:
    """SDXL's architecture (UNet 2.6 B, the SD VAE with SDXL's scaling factor, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14
    text encoders) with random weights, saved in fp16 in diffusers layout, with a random TAESD for SDXL as its tiny
    VAE. About 7 GB on disk; in fp32 about 10 GB in memory, so one process holds one copy (benchmarks.run)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_demo.models import TINY_VAE_DIR
    from tests.tiny_models import make_clip_tokenizer

    tok = make_clip_tokenizer(folder / "tokenizer_src")
    n = len(tok)
    clip = dict(vocab_size=n, max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
                pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
            sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, hidden_act="quick_gelu", **clip))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         projection_dim=1280, hidden_act="gelu", **clip))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.to(torch.float16).save_pretrained(folder / "sdxl")
    AutoencoderTiny().to(torch.float16).save_pretrained(folder / "sdxl" / TINY_VAE_DIR)  # TAESDXL's architecture
    return str(folder / "sdxl")
