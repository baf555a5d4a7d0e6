"""Tiny random FLUX(.1-Kontext) reference components built with diffusers/transformers (torch imported lazily).

Used by the tests, the parity tool's self-check and the CLI smoke tests: everything is built offline from configs
(models.md 2.8, env-notes "Tiny FLUX.1-Kontext pipeline, offline"), never downloaded.
"""
from __future__ import annotations

import json
import os

TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def torch_transformer(seed: int = 0, perturb: float = 0.1, **overrides):
    """diffusers FluxTransformer2DModel with the tiny config; biases and norm weights are perturbed by
    `perturb * N(0, 1)` so that every parameter influences the output."""
    import torch
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**{**TINY_TRANSFORMER, **overrides}).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(perturb * torch.randn_like(p))
    return m


def _byte_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges (CLIP tokenizer needs the `</w>` variants)."""
    # GPT-2 byte -> printable unicode table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return vocab


def torch_kontext_pipeline(seed: int = 0, latent_channels: int = 4):
    """A complete tiny diffusers FluxKontextPipeline. The VAE has two blocks (vae_scale_factor 2), so sizes are
    multiples of 4 pixels and an HxW image has (H/4)(W/4) packed tokens.

    transformer in_channels = 4 * latent_channels (2x2 packing)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    torch.manual_seed(seed)
    tr = torch_transformer(seed, in_channels=4 * latent_channels, joint_attention_dim=32, pooled_projection_dim=32)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=1000, hidden_act="gelu", projection_dim=32,
                                        max_position_embeddings=77)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")).eval()
    clip_tok = CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77, bos_token="<|startoftext|>",
                             eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    t5_tok = _t5_tokenizer(T5TokenizerFast)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxKontextPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                               tokenizer_2=t5_tok, transformer=tr)


def _t5_tokenizer(cls):
    """A unigram T5 tokenizer over lowercase letters (offline, no sentencepiece model file)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    return cls(vocab=vocab, extra_ids=0)


def save_pipeline(pipe, out_dir: str) -> str:
    pipe.save_pretrained(out_dir)
    return out_dir


def describe(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "model_index.json")) as f:
        return json.load(f)
