"""FLUX transformer in Black Forest Labs' single-file layout (`models/flux/bfl_format.py`, `load_transformer(file)`,
`save_transformer_bfl`).

- the BFL -> diffusers mapping equals diffusers' own single-file converter
  (`convert_flux_transformer_checkpoint_to_diffusers`) tensor for tensor, on a random BFL state dict with FLUX.1's
  row counts (inner dim 3072: the converter hard-codes it) and narrow columns, with and without ComfyUI's prefix;
- a tiny diffusers model -> ours -> BFL file -> ours: config inferred, params bit-identical, velocity equal to
  diffusers' (fp32, highest precision, rel err max|a-b|/max|b| <= 1e-5); back to a diffusers folder, weights equal;
- bad files raise errors that name the problem.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402

from edit_r1_jax.models import flux  # noqa: E402
from edit_r1_jax.models.flux import bfl_format, parity  # noqa: E402
from edit_r1_jax.models.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors  # noqa: E402
from helpers.flux_forward import kontext_inputs, ours_forward, rel_err, torch_forward  # noqa: E402

INNER, MLP, HEAD = 3072, 12288, 128


def random_bfl_state(n_double=2, n_single=2, cols=3, seed=0):
    """BFL names and row counts of FLUX.1 (inner 3072), ``cols`` columns (the mapping only moves rows)."""
    rng = np.random.default_rng(seed)
    rows = {"img_in": (INNER, 64), "txt_in": (INNER, cols), "final_layer.linear": (64, cols),
            "final_layer.adaLN_modulation.1": (2 * INNER, cols)}
    for emb in ("time_in", "vector_in", "guidance_in"):
        rows[f"{emb}.in_layer"], rows[f"{emb}.out_layer"] = (INNER, cols), (INNER, cols)
    for i in range(n_double):
        for s in ("img", "txt"):
            rows.update({f"double_blocks.{i}.{s}_mod.lin": (6 * INNER, cols),
                         f"double_blocks.{i}.{s}_attn.qkv": (3 * INNER, cols),
                         f"double_blocks.{i}.{s}_attn.proj": (INNER, cols),
                         f"double_blocks.{i}.{s}_mlp.0": (MLP, cols), f"double_blocks.{i}.{s}_mlp.2": (INNER, cols)})
    for i in range(n_single):
        rows.update({f"single_blocks.{i}.modulation.lin": (3 * INNER, cols),
                     f"single_blocks.{i}.linear1": (3 * INNER + MLP, cols), f"single_blocks.{i}.linear2": (INNER, cols)})
    state = {}
    for stem, (r, c) in rows.items():
        state[f"{stem}.weight"] = rng.standard_normal((r, c)).astype(np.float32)
        state[f"{stem}.bias"] = rng.standard_normal(r).astype(np.float32)
    norms = [f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale" for i in range(n_double) for s in ("img", "txt")
             for q in ("query", "key")]
    norms += [f"single_blocks.{i}.norm.{q}_norm.scale" for i in range(n_single) for q in ("query", "key")]
    state.update({n: rng.standard_normal(HEAD).astype(np.float32) for n in norms})
    return state


@pytest.mark.parametrize("prefix", ["", bfl_format.COMFY_PREFIX])
def test_mapping_equals_diffusers_single_file_converter(tmp_path, prefix):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    state = random_bfl_state()
    write_safetensors({prefix + k: v for k, v in state.items()}, str(tmp_path), basename="flux1")
    reader = bfl_format.BflReader(str(tmp_path / "flux1.safetensors"))
    want = convert_flux_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v) for k, v in state.items()})
    assert sorted(reader.keys()) == sorted(want)
    for name, ref in want.items():
        assert reader.shape(name) == tuple(ref.shape), name
        np.testing.assert_array_equal(reader.get(name), ref.numpy(), err_msg=name)
    back = bfl_format.to_bfl_state_dict({k: reader.get(k) for k in reader.keys()}, INNER)   # and the inverse
    assert sorted(back) == sorted(state)
    for name, ref in state.items():
        np.testing.assert_array_equal(back[name], ref, err_msg=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = parity.torch_transformer(seed=0)
    d = tmp_path_factory.mktemp("bfl")
    model.save_pretrained(str(d / "diffusers"))
    tcfg, tparams = flux.load_transformer(str(d / "diffusers"))
    return model, tcfg, tparams, d


@pytest.mark.parametrize("comfy", [False, True])
def test_tiny_model_through_a_bfl_file(tiny, tmp_path, comfy):
    model, tcfg, tparams, _ = tiny
    path = flux.save_transformer_bfl(tcfg, tparams, str(tmp_path / "tiny_bfl.safetensors"))
    keys = SafetensorsReader(path).keys()
    assert "double_blocks.1.img_attn.qkv.weight" in keys and "single_blocks.0.linear1.weight" in keys
    if comfy:       # the same tensors under ComfyUI's prefix, in an all-in-one file with a VAE tensor beside them
        r = SafetensorsReader(path)
        tensors = {bfl_format.COMFY_PREFIX + k: np.array(r.get(k)) for k in keys}
        tensors["first_stage_model.decoder.conv_in.weight"] = np.zeros((4, 3), np.float32)
        write_safetensors(tensors, str(tmp_path), basename="comfy")
        path = str(tmp_path / "comfy.safetensors")
    cfg2, params2 = flux.load_transformer(path, axes_dims_rope=tcfg.axes_dims_rope)
    assert cfg2 == tcfg
    assert jax.tree.structure(params2) == jax.tree.structure(tparams)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(tparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = kontext_inputs(tcfg, seed=1, n_txt=4, timestep=0.4, guidance=3.0)
    assert rel_err(ours_forward(cfg2, params2, x), torch_forward(model, x)) <= 1e-5
    flux.save_transformer(cfg2, params2, str(tmp_path / "back"))           # and on to a diffusers folder
    from diffusers import FluxTransformer2DModel
    back = FluxTransformer2DModel.from_pretrained(str(tmp_path / "back")).state_dict()
    for name, p in model.state_dict().items():
        np.testing.assert_array_equal(back[name].numpy(), p.numpy(), err_msg=name)


def test_bad_bfl_files_are_named(tiny, tmp_path):
    _, tcfg, tparams, _ = tiny
    path = flux.save_transformer_bfl(tcfg, tparams, str(tmp_path / "ok.safetensors"))
    with pytest.raises(CheckpointError, match="pass axes_dims_rope"):       # head dim 16: not FLUX.1's 128
        flux.load_transformer(path)
    r = SafetensorsReader(path)
    full = {k: np.array(r.get(k)) for k in r.keys()}
    extra = dict(full, **{"vae.decoder.conv_in.weight": np.zeros(3, np.float32)})
    write_safetensors(extra, str(tmp_path), basename="extra")
    with pytest.raises(CheckpointError, match="vae.decoder.conv_in.weight"):
        flux.load_transformer(str(tmp_path / "extra.safetensors"), axes_dims_rope=tcfg.axes_dims_rope)
    missing = {k: v for k, v in full.items() if k != "double_blocks.0.img_mlp.2.weight"}
    write_safetensors(missing, str(tmp_path), basename="missing")
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.ff\.net\.2\.weight"):
        flux.load_transformer(str(tmp_path / "missing.safetensors"), axes_dims_rope=tcfg.axes_dims_rope)
    write_safetensors({"foo.weight": np.zeros(2, np.float32)}, str(tmp_path), basename="other")
    with pytest.raises(CheckpointError, match="not a BFL FLUX transformer"):
        flux.load_transformer(str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="must end in .safetensors"):
        flux.save_transformer_bfl(tcfg, tparams, str(tmp_path / "x.bin"))
