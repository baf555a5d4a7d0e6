"""Build the image editor (FLUX.1-Kontext) for a training or evaluation run: transformer config and params, image
codec, frozen text encoders, tokenizers, schedule, RoPE tables, and the Kontext velocity call.

``config.editor`` (defaults ``EDITOR_DEFAULTS``):
  checkpoint      a diffusers FluxKontextPipeline directory (transformer/, vae/, text_encoder/, text_encoder_2/,
                  tokenizer/, tokenizer_2/) or an editor exported by ``edit-r1-jax editor-sft`` (the same layout
                  plus ``editor.json``); "" = a random tiny editor of the sizes below
  image_size      square side (pixels) of source and edited images; the reference image is resized to it
  codec_factor    random editor: pixel-codec factor (latents = image block means, ``flux/pixel_codec.py``)
  tokenizer       random editor: "" = the synthetic world's BPE tokenizer (cached in WORKDIR/tokenizer), "bytes" =
                  UTF-8 bytes (no training), or a tokenizer directory
  hidden/heads/double_blocks/single_blocks/text_hidden/text_layers/text_heads   random-editor sizes
  t5_len, clip_len  text lengths (T5 tokens = text tokens of the transformer; CLIP is pooled at its EOS)
  guidance        guidance-embedding value (FLUX.1-Kontext-dev is guidance-distilled: 2.5 in Flow-GRPO)
  seed            random editor: seed of the host-side init
  num_train_prompts, num_eval_prompts   synthetic-world prompt counts; train_jsonl / eval_jsonl = editing-prompt
                  JSONL files instead (``read_edit_jsonl``)
  sample_steps, sft_timestep_sampling, export   editor SFT: ODE steps of its evaluation, training sigma law
                  (uniform | logit_normal), write WORKDIR/editor at the end

Decision (synthetic world / tiny config): no trained VAE exists, so latents are pixels (``pixel_codec``) with the
same NCHW interface as the VAE; the Kontext 2x2 packing then gives (h/2)(w/2) tokens of 12 channels. The frozen T5 and
CLIP are tiny random models fed with the world tokenizer's ids (T5/CLIP sequences end with its EOS and are padded with
its pad id). Random params are drawn on the host with NumPy (``encoders_convert.random_params``): compiling a random
init is very slow on CPU.

Token layout of one transformer call (diffusers ``FluxKontextPipeline``): text tokens (ids 0), target tokens (ids
(0, r, c)), reference tokens (ids (1, r, c)); the velocity is read from the target tokens only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edit_r1_jax import parallel
from edit_r1_jax.models.flux import pixel_codec
from edit_r1_jax.models.flux import transformer as tr
from edit_r1_jax.models.flux.config import FluxTransformerConfig
from edit_r1_jax.models.flux.pipeline import latent_image_ids, pack_latents, unpack_latents
from edit_r1_jax.models.flux.scheduler import FlowMatchEulerScheduler, model_timestep
from edit_r1_jax.train.state import cfg_get

log = logging.getLogger(__name__)

EDITOR_META = "editor.json"
EDITOR_DEFAULTS = dict(checkpoint="", image_size=64, codec_factor=4, tokenizer="", hidden=32, heads=2,
                       double_blocks=1, single_blocks=1, text_hidden=32, text_layers=1, text_heads=2, t5_len=32,
                       clip_len=16, guidance=2.5, seed=0, dtype="float32", remat="none")
_TEXT_CHUNK = 8      # texts are encoded in fixed-size chunks (one compile)


def editor_options(config: Any) -> dict:
    e = cfg_get(config, "editor", {})
    out = {}
    for k, v in EDITOR_DEFAULTS.items():
        val = cfg_get(e, k, v)
        out[k] = type(v)(val) if v is not None and not isinstance(v, str) else val
    return out


# ----------------------------------------------------------------------------------------------------------------
# tokenizers

class SingleTokenizer:
    """One tokenizer feeding both T5 and CLIP (random editors): ids + EOS, padded with ``pad`` to each length."""

    def __init__(self, encode, vocab_size: int, eos_id: int, pad_id: int, kind: str, hf=None):
        self.encode, self.vocab_size, self.eos_id, self.pad_id, self.kind, self.hf = \
            encode, int(vocab_size), int(eos_id), int(pad_id), kind, hf
        if self.eos_id == 2:
            raise ValueError("editor tokenizer: EOS id 2 would make CLIP pool at argmax(ids); use another id")

    def ids(self, texts: Sequence[str], length: int) -> np.ndarray:
        out = np.full((len(texts), length), self.pad_id, np.int32)
        for i, t in enumerate(texts):
            row = list(self.encode(t))[: length - 1] + [self.eos_id]
            out[i, : len(row)] = row
        return out

    def __call__(self, texts: Sequence[str], t5_len: int, clip_len: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (t5_ids [B, t5_len], clip_ids [B, clip_len]) int32."""
        return self.ids(texts, t5_len), self.ids(texts, clip_len)


def bytes_tokenizer() -> SingleTokenizer:
    """UTF-8 bytes: pad 0, EOS 1, byte b -> b + 3 (vocabulary 259)."""
    return SingleTokenizer(lambda t: [b + 3 for b in t.encode("utf-8")], 259, 1, 0, "bytes")


def hf_single_tokenizer(path: str) -> SingleTokenizer:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return SingleTokenizer(lambda t: tok(t, add_special_tokens=False).input_ids, len(tok), eos, pad, "hf", hf=tok)


class PairTokenizer:
    """FLUX's CLIP (``tokenizer/``) and T5 (``tokenizer_2/``) tokenizers, as diffusers uses them."""

    kind = "flux"

    def __init__(self, pipeline_dir: str):
        from edit_r1_jax.models.flux import tokenization
        self.clip, self.t5 = tokenization.load_tokenizers(pipeline_dir)

    def __call__(self, texts: Sequence[str], t5_len: int, clip_len: int) -> tuple[np.ndarray, np.ndarray]:
        from edit_r1_jax.models.flux import tokenization
        clip_ids, t5_ids = tokenization.tokenize_prompts(self.clip, self.t5, list(texts), t5_len)
        return t5_ids, clip_ids[:, :clip_len] if clip_ids.shape[1] > clip_len else clip_ids


# ----------------------------------------------------------------------------------------------------------------
# the setup

@dataclasses.dataclass
class EditorSetup:
    """Everything about the editor except its trainable state. Arrays returned to the host are NumPy."""
    tcfg: FluxTransformerConfig
    codec: Any                     # PixelCodecConfig or flux.vae.VAEConfig
    vparams: Any                   # VAE params (None for the pixel codec)
    t5cfg: Any
    t5params: Any
    clipcfg: Any
    clipparams: Any
    tokenizer: Any                 # SingleTokenizer | PairTokenizer
    image_size: int
    t5_len: int
    clip_len: int
    guidance: float
    checkpoint: str = ""
    seed: int = 0
    scheduler: FlowMatchEulerScheduler = dataclasses.field(default_factory=FlowMatchEulerScheduler)
    tokenizer_dir: str = ""        # world tokenizer directory (exported with the editor)
    _text_cache: dict = dataclasses.field(default_factory=dict, repr=False)
    _lock: Any = dataclasses.field(default_factory=threading.Lock, repr=False)

    # -- geometry ------------------------------------------------------------------------------------------------
    @property
    def is_pixel(self) -> bool:
        return isinstance(self.codec, pixel_codec.PixelCodecConfig)

    @property
    def scale_factor(self) -> int:
        if self.is_pixel:
            return self.codec.scale_factor
        return 2 ** (len(self.codec.block_out_channels) - 1)

    @property
    def latent_hw(self) -> tuple[int, int]:
        side = self.image_size // self.scale_factor
        return side, side

    @property
    def num_tokens(self) -> int:
        """Packed target tokens L (the reference adds as many)."""
        h, w = self.latent_hw
        return (h // 2) * (w // 2)

    @property
    def token_channels(self) -> int:
        return self.tcfg.in_channels

    def rope(self) -> tuple[jax.Array, jax.Array]:
        """cos, sin [t5_len + 2L, head_dim/2] for ids cat(text zeros, target (0,r,c), reference (1,r,c))."""
        h, w = self.latent_hw
        ids = np.concatenate([np.zeros((self.t5_len, 3), np.float32), latent_image_ids(h // 2, w // 2, 0.0),
                              latent_image_ids(h // 2, w // 2, 1.0)])
        return tr.rope_from_ids(ids.astype(np.float64), self.tcfg.axes_dims_rope, self.tcfg.theta)

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas [S+1] float32 ending in 0, model timesteps [S] = timesteps / 1000) for the target length."""
        sigmas, timesteps = self.scheduler.schedule(int(num_steps), self.num_tokens)
        return np.asarray(sigmas, np.float32), np.asarray(model_timestep(timesteps), np.float32)

    # -- params --------------------------------------------------------------------------------------------------
    def param_logical_axes(self) -> Any:
        return _logical_axes(self.tcfg)

    def param_shapes(self) -> Any:
        return _param_shapes(self.tcfg)

    def transformer_params(self, mesh=None, rules=None) -> dict:
        """The base transformer: loaded from the checkpoint or random (host NumPy, seed ``editor.seed``), placed on
        ``mesh`` by the logical axes when given."""
        if self.checkpoint:
            from edit_r1_jax.models.flux import convert
            _, params = convert.load_transformer(self.checkpoint, dtype=self.tcfg.param_dtype, mesh=mesh,
                                                 rules=rules, remat=self.tcfg.remat)
            return params
        from edit_r1_jax.models.flux import encoders_convert as conv
        params = conv.random_params(self.param_shapes(), jax.random.PRNGKey(self.seed))
        return self.place(params, mesh, rules)

    def place(self, params: Any, mesh=None, rules=None) -> Any:
        if mesh is None:
            return params
        rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
        sh = parallel.logical_shardings(self.param_logical_axes(), mesh, rules, shapes=self.param_shapes())
        return parallel.shard_tree(params, sh)

    # -- text ----------------------------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (prompt_embeds [B, t5_len, D_t5], pooled [B, D_clip]) float32 NumPy (cached per text)."""
        from edit_r1_jax.models.flux import clip, t5
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
            for lo in range(0, len(todo), _TEXT_CHUNK):
                chunk = todo[lo:lo + _TEXT_CHUNK]
                padded = chunk + [""] * (_TEXT_CHUNK - len(chunk))
                t5_ids, clip_ids = self.tokenizer(padded, self.t5_len, self.clip_len)
                emb = np.asarray(jax.device_get(t5.t5_encode(self.t5cfg, self.t5params, jnp.asarray(t5_ids))),
                                 np.float32)
                _, pooled = clip.clip_encode(self.clipcfg, self.clipparams, jnp.asarray(clip_ids))
                pooled = np.asarray(jax.device_get(pooled), np.float32)
                for i, t in enumerate(chunk):
                    self._text_cache[t] = (emb[i], pooled[i])
            got = [self._text_cache[t] for t in texts]
        return np.stack([g[0] for g in got]), np.stack([g[1] for g in got])

    # -- images --------------------------------------------------------------------------------------------------
    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        """Images (uint8 HWC arrays, paths, PIL, ...) -> [B, 3, S, S] float32 in [-1, 1] at ``image_size``."""
        from edit_r1_jax.data.formats import load_image
        from edit_r1_jax.models.flux.pipeline import preprocess_image
        s = self.image_size
        out = []
        for im in images:
            arr = im if isinstance(im, np.ndarray) and im.dtype == np.uint8 else load_image(im)
            if arr.shape[:2] == (s, s):
                x = arr.astype(np.float32) / 255.0
                out.append((2.0 * x - 1.0).transpose(2, 0, 1))
            else:
                out.append(preprocess_image(arr, s, s)[0])
        return np.stack(out).astype(np.float32)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """Images -> packed normalised latents [B, L, 4C] float32."""
        x = self.pixels(images)
        if self.is_pixel:
            lat = pixel_codec.encode(self.codec, x)
        else:
            from edit_r1_jax.models.flux import vae
            lat = vae.normalize_latents(self.codec, _vae_encode(self.codec, self.vparams, jnp.asarray(x)))
        return np.asarray(jax.device_get(pack_latents(jnp.asarray(lat, jnp.float32))), np.float32)

    def decode(self, packed: Any) -> np.ndarray:
        """Packed latents [B, L, 4C] -> uint8 images [B, S, S, 3]."""
        h, w = self.latent_hw
        lat = unpack_latents(jnp.asarray(packed, jnp.float32), h, w)
        if self.is_pixel:
            x = pixel_codec.decode(self.codec, pixel_codec.denormalize_latents(self.codec, lat))
        else:
            from edit_r1_jax.models.flux import vae
            x = vae.vae_decode(self.codec, self.vparams, vae.denormalize_latents(self.codec, lat))
        x01 = np.clip(np.asarray(jax.device_get(x), np.float32) / 2.0 + 0.5, 0.0, 1.0)
        return (x01.transpose(0, 2, 3, 1) * 255.0 + 0.5).astype(np.uint8)

    # -- conditioning ----------------------------------------------------------------------------------------------
    def conditioning(self, records: Sequence[dict]) -> dict:
        """Records (``instruction``, ``source``) -> host cond dict: prompt_embeds [B,T,D], pooled [B,Dp],
        ref [B,L,4C] (packed source latents), guidance [B]."""
        emb, pooled = self.encode_text([r["instruction"] for r in records])
        ref = self.encode_images([r["source"] for r in records])
        return {"prompt_embeds": emb, "pooled": pooled, "ref": ref,
                "guidance": np.full((len(records),), self.guidance, np.float32)}

    # -- export ----------------------------------------------------------------------------------------------------
    def save(self, params: Any, out_dir: str) -> str:
        """Write a loadable editor directory (diffusers layout + ``editor.json``) with these transformer params."""
        from edit_r1_jax.models.flux import clip, convert, t5
        convert.save_transformer(self.tcfg, params, os.path.join(out_dir, "transformer"))
        if jax.process_index() != 0:
            return out_dir
        t5.save_t5(self.t5cfg, jax.device_get(self.t5params), os.path.join(out_dir, "text_encoder_2"))
        clip.save_clip(self.clipcfg, jax.device_get(self.clipparams), os.path.join(out_dir, "text_encoder"))
        meta = {"image_size": self.image_size, "t5_len": self.t5_len, "clip_len": self.clip_len,
                "guidance": self.guidance, "tokenizer": getattr(self.tokenizer, "kind", "flux")}
        if self.is_pixel:
            meta["codec"] = self.codec.to_json()
        else:
            from edit_r1_jax.models.flux import vae
            vae.save_vae(self.codec, jax.device_get(self.vparams), os.path.join(out_dir, "vae"))
            meta["codec"] = {"type": "vae"}
        if isinstance(self.tokenizer, SingleTokenizer) and self.tokenizer.hf is not None:
            self.tokenizer.hf.save_pretrained(os.path.join(out_dir, "tokenizer"))
        elif isinstance(self.tokenizer, PairTokenizer):
            self.tokenizer.clip.save_pretrained(os.path.join(out_dir, "tokenizer"))
            self.tokenizer.t5.save_pretrained(os.path.join(out_dir, "tokenizer_2"))
        with open(os.path.join(out_dir, EDITOR_META), "w") as f:
            json.dump(meta, f, indent=2)
        return out_dir


@functools.lru_cache(maxsize=8)
def _logical_axes(tcfg: FluxTransformerConfig) -> Any:
    return tr.param_logical_axes(tcfg)


@functools.lru_cache(maxsize=8)
def _param_shapes(tcfg: FluxTransformerConfig) -> Any:
    return tr.param_shapes(tcfg)


@functools.partial(jax.jit, static_argnums=0)
def _vae_encode(vcfg, vparams, x):
    from edit_r1_jax.models.flux import vae
    return vae.vae_encode(vcfg, vparams, x)


# ----------------------------------------------------------------------------------------------------------------
# the velocity (one Kontext transformer call)

def velocity(tcfg: FluxTransformerConfig, params: Any, x_blc: jax.Array, cond: dict, t_b: jax.Array, cos, sin, *,
             lora: Any = None, lora_scale: float = 1.0, mesh=None, rules=None) -> jax.Array:
    """v_theta(x, t | text, reference) [B, L, 4C]: the transformer on cat(x, ref) tokens, target tokens kept.

    x_blc [B, L, 4C] noisy target tokens; cond: prompt_embeds [B, T, D], pooled [B, Dp], ref [B, L, 4C],
    guidance [B] (ignored without guidance embeddings); t_b [B] = sigma (the pipeline's timestep / 1000).
    ``lora``: adapter tree (``models/lora.py``) added inside the adapted layers with ``lora_scale``; None = base.
    """
    out_len = x_blc.shape[1]
    inp = jnp.concatenate([x_blc.astype(tcfg.dtype), cond["ref"].astype(tcfg.dtype)], axis=1)
    guidance = cond.get("guidance") if tcfg.guidance_embeds else None
    return tr.forward_with_rope(tcfg, params, inp, cond["prompt_embeds"], cond["pooled"], t_b, cos, sin, guidance,
                                lora=lora, lora_scale=lora_scale, out_len=out_len, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------------------------
# building

def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}[name]


def _tokenizer(opts: dict, workdir: str | None) -> tuple[SingleTokenizer, str]:
    spec = opts["tokenizer"]
    if spec == "bytes":
        return bytes_tokenizer(), ""
    if spec:
        return hf_single_tokenizer(spec), spec
    from edit_r1_jax.data.world_tokenizer import ensure_world_tokenizer
    path = os.path.join(workdir or ".", "tokenizer")
    ensure_world_tokenizer(path)
    return hf_single_tokenizer(path), path


def tiny_transformer_config(opts: dict, in_channels: int, text_dim: int, pooled_dim: int) -> FluxTransformerConfig:
    heads = int(opts["heads"])
    head_dim = int(opts["hidden"]) // heads
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"editor.hidden={opts['hidden']} / editor.heads={heads}: head_dim must be even and >= 8")
    a = (head_dim // 4) // 2 * 2                       # FLUX splits (16, 56, 56) of 128: ~1/8, 7/16, 7/16
    rest = head_dim - a
    b = rest // 2 // 2 * 2
    axes = (a, b, rest - b)
    dt = _dtype(opts["dtype"])
    return FluxTransformerConfig(in_channels=in_channels, num_layers=int(opts["double_blocks"]),
                                 num_single_layers=int(opts["single_blocks"]), attention_head_dim=head_dim,
                                 num_attention_heads=heads, joint_attention_dim=text_dim,
                                 pooled_projection_dim=pooled_dim, guidance_embeds=True, axes_dims_rope=axes,
                                 dtype=dt, param_dtype=jnp.float32, remat=opts["remat"])


def _random_text_encoders(opts: dict, tok: SingleTokenizer, seed: int):
    from edit_r1_jax.models.flux import clip, t5
    d, heads = int(opts["text_hidden"]), int(opts["text_heads"])
    t5cfg = t5.T5Config(vocab_size=tok.vocab_size, d_model=d, d_kv=d // heads, d_ff=2 * d,
                        num_layers=int(opts["text_layers"]), num_heads=heads, feed_forward_proj="gated-gelu")
    clipcfg = clip.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=d, intermediate_size=2 * d,
                                  num_hidden_layers=int(opts["text_layers"]), num_attention_heads=heads,
                                  max_position_embeddings=max(int(opts["clip_len"]), 2), bos_token_id=tok.pad_id,
                                  pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, projection_dim=d)
    t5p = t5.init_t5(t5cfg, jax.random.PRNGKey(seed + 1))
    clipp = clip.init_clip(clipcfg, jax.random.PRNGKey(seed + 2))
    return t5cfg, t5p, clipcfg, clipp


def build_editor(config: Any, workdir: str | None = None, checkpoint: str | None = None) -> EditorSetup:
    """The editor of ``config.editor`` (or of ``checkpoint`` when given)."""
    opts = editor_options(config)
    ckpt = opts["checkpoint"] if checkpoint is None else checkpoint
    if ckpt:
        return load_editor(ckpt, opts)
    tok, tok_dir = _tokenizer(opts, workdir)
    seed = int(opts["seed"])
    t5cfg, t5p, clipcfg, clipp = _random_text_encoders(opts, tok, seed)
    codec = pixel_codec.PixelCodecConfig(int(opts["codec_factor"]))
    tcfg = tiny_transformer_config(opts, 4 * codec.latent_channels, t5cfg.d_model, clipcfg.hidden_size)
    setup = EditorSetup(tcfg=tcfg, codec=codec, vparams=None, t5cfg=t5cfg, t5params=t5p, clipcfg=clipcfg,
                        clipparams=clipp, tokenizer=tok, image_size=int(opts["image_size"]),
                        t5_len=int(opts["t5_len"]), clip_len=int(opts["clip_len"]), guidance=float(opts["guidance"]),
                        checkpoint="", seed=seed, tokenizer_dir=tok_dir)
    _check_geometry(setup)
    return setup


def load_editor(path: str, opts: dict | None = None) -> EditorSetup:
    """A diffusers FluxKontextPipeline directory or an exported editor (``editor.json`` present)."""
    from edit_r1_jax.models.flux import clip, convert, t5
    opts = dict(EDITOR_DEFAULTS if opts is None else opts)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"editor checkpoint directory not found: {path}")
    meta_path = os.path.join(path, EDITOR_META)
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    dt = _dtype(opts["dtype"])
    tdir = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
    tcfg = FluxTransformerConfig.from_diffusers(convert.read_config(tdir), dtype=dt, param_dtype=dt,
                                                remat=opts["remat"])
    t5cfg, t5p = t5.load_t5(path, dtype=jnp.float32)
    clipcfg, clipp = clip.load_clip(path, dtype=jnp.float32)
    codec_meta = meta.get("codec", {"type": "vae"})
    if codec_meta.get("type") == "pixel":
        codec, vparams = pixel_codec.PixelCodecConfig.from_json(codec_meta), None
    else:
        from edit_r1_jax.models.flux import vae
        codec, vparams = vae.load_vae(path, dtype=jnp.float32)
    kind = meta.get("tokenizer", "flux")
    tok_dir = ""
    if kind == "bytes":
        tok = bytes_tokenizer()
    elif kind == "hf":
        tok_dir = os.path.join(path, "tokenizer")
        tok = hf_single_tokenizer(tok_dir)
    else:
        tok = PairTokenizer(path)
    setup = EditorSetup(tcfg=tcfg, codec=codec, vparams=vparams, t5cfg=t5cfg, t5params=t5p, clipcfg=clipcfg,
                        clipparams=clipp, tokenizer=tok,
                        image_size=int(meta.get("image_size", opts["image_size"])),
                        t5_len=int(meta.get("t5_len", opts["t5_len"] if meta else 512)),
                        clip_len=int(meta.get("clip_len", opts["clip_len"] if meta else 77)),
                        guidance=float(meta.get("guidance", opts["guidance"])), checkpoint=path,
                        scheduler=FlowMatchEulerScheduler.from_pretrained(path), tokenizer_dir=tok_dir)
    _check_geometry(setup)
    return setup


def _check_geometry(setup: EditorSetup) -> None:
    f = setup.scale_factor
    if setup.image_size % (2 * f):
        raise ValueError(f"editor.image_size={setup.image_size} must be a multiple of 2 x the codec factor ({2 * f})")
    c = 4 * (setup.codec.latent_channels if setup.is_pixel else setup.codec.latent_channels)
    if setup.tcfg.in_channels != c:
        raise ValueError(f"editor: transformer in_channels={setup.tcfg.in_channels} but the codec packs {c} channels")


# ----------------------------------------------------------------------------------------------------------------
# records

def read_edit_jsonl(path: str) -> list:
    """Editing prompts, one JSON object a line: ``instruction`` and ``source`` (image path relative to the file,
    or a data URI) required; ``principles``, ``target`` (image), ``category``, ``id`` optional."""
    from edit_r1_jax.data.formats import ALIASES, load_image
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            rec = {ALIASES.get(k, k): v for k, v in rec.items()}
            for k in ("instruction", "source"):
                if not rec.get(k):
                    raise ValueError(f"{path}:{n}: missing required field '{k}'")
            rec["source"] = load_image(rec["source"], base)
            if rec.get("target") is not None and not isinstance(rec["target"], np.ndarray):
                rec["target"] = load_image(rec["target"], base)
            rec.setdefault("id", f"{os.path.basename(path)}:{n}")
            rec.setdefault("category", "all")
            out.append(rec)
    return out


def edit_records(config: Any, split: str = "train", image_size: int | None = None) -> list:
    """Editing prompts for the editor: ``editor.train_jsonl`` / ``editor.eval_jsonl`` if set, else the synthetic
    world (``editor.num_train_prompts`` / ``num_eval_prompts``, rendered at ``image_size``)."""
    e = cfg_get(config, "editor", {})
    path = cfg_get(e, "train_jsonl" if split == "train" else "eval_jsonl", "")
    if path:
        return read_edit_jsonl(path)
    from edit_r1_jax.data import synthetic
    n = int(cfg_get(e, "num_train_prompts" if split == "train" else "num_eval_prompts", 64 if split == "train" else 8))
    seed = int(cfg_get(config, "seed", 0)) + (0 if split == "train" else 1000)
    size = int(image_size or cfg_get(e, "image_size", EDITOR_DEFAULTS["image_size"]))
    return synthetic.make_edit_prompts(n, seed=seed, size=size)
