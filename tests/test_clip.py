"""CLIP: parity with open_clip and Hugging Face ``CLIPModel`` (both towers, random weights,
models built from configs only), the three checkpoint sources through the conversion CLI,
strict key mapping, per-block outputs, resampled input sizes, and the image tower as a
``Detector`` backbone."""

from __future__ import annotations

import functools
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub calls

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

import backbone_parity as bp  # noqa: E402

from csdfd_jax.models import clip, convert, detector  # noqa: E402
from csdfd_jax.models.layers import param_count  # noqa: E402
from csdfd_jax.models.weights import (  # noqa: E402
  WeightMappingError,
  load_state_dict,
  load_variables,
)

TOL = dict(rtol=1e-3, atol=1e-4)
EOT = 49407


def _close(got, want, what: str) -> None:
  """assert_allclose at TOL, printing the max abs / rel differences (shown with ``-s``)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  diff = np.abs(got - want)
  rel = diff / np.maximum(np.abs(want), 1e-3)
  print(
    f"{what}: max abs {diff.max():.2e}, max rel {rel.max():.2e}, max |ref| {np.abs(want).max():.2f}"
  )
  np.testing.assert_allclose(got, want, **TOL)


def _open_clip_model(variant: str, *, quick_gelu: bool = True, image_size: int | None = None):
  cfg = clip.VARIANTS[variant]
  v, t = cfg["vision"], cfg["text"]
  vision = dict(
    layers=v["layers"],
    width=v["width"],
    head_width=v["width"] // v["heads"],
    patch_size=v["patch_size"],
    image_size=image_size or v["image_size"],
  )
  text = {k: t[k] for k in ("context_length", "vocab_size", "width", "heads", "layers")}
  return open_clip.model.CLIP(cfg["embed_dim"], vision, text, quick_gelu=quick_gelu).eval()


def _randomize(model, seed: int = 0, *, norms=("ln_", "layer_norm", "layrnorm", "layernorm")):
  """Every tensor random (LayerNorm weights around 1), logit scale log(1/0.07) as CLIP's."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      is_norm_weight = name.endswith("weight") and any(n in name for n in norms)
      p.copy_(noise + 1.0 if is_norm_weight else noise)
    model.logit_scale.fill_(math.log(1 / 0.07))
  return model


def _hf_model(variant: str, seed: int = 0, *, randomize: bool = True):
  cfg = clip.VARIANTS[variant]
  v, t = cfg["vision"], cfg["text"]
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=t["vocab_size"],
      hidden_size=t["width"],
      intermediate_size=4 * t["width"],
      num_hidden_layers=t["layers"],
      num_attention_heads=t["heads"],
      max_position_embeddings=t["context_length"],
      hidden_act="quick_gelu",
      eos_token_id=EOT,
    ),
    vision_config=dict(
      hidden_size=v["width"],
      intermediate_size=4 * v["width"],
      num_hidden_layers=v["layers"],
      num_attention_heads=v["heads"],
      image_size=v["image_size"],
      patch_size=v["patch_size"],
      hidden_act="quick_gelu",
    ),
    projection_dim=cfg["embed_dim"],
  )
  model = transformers.CLIPModel(config).eval()
  return _randomize(model, seed) if randomize else model


def _inputs(variant: str, seed: int = 0, *, images: int = 2, lengths=(4, 11, 77)):
  """NCHW float images and token ids: SOT, random words, EOT (the largest id), zero padding."""
  cfg = clip.VARIANTS[variant]
  size = cfg["vision"]["image_size"]
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(images, 3, size, size)).astype(np.float32)
  ids = np.zeros((len(lengths), cfg["text"]["context_length"]), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(1, EOT - 1, n)
    ids[row, 0], ids[row, n - 1] = EOT - 1, EOT
  return x, ids


def _torch_outputs(model, x, ids):
  with torch.no_grad():
    x, ids = torch.from_numpy(x), torch.from_numpy(ids)
    image, text = model.encode_image(x).numpy(), model.encode_text(ids).numpy()
    return image, text, model.get_logits(x, ids)[0].numpy()


def _jax_outputs(model: clip.CLIP, variables, x, ids):
  """(image features, text features, logits) in one compilation."""

  def run(v, x, ids):
    image = model.apply(v, x, method="encode_image")
    text = model.apply(v, ids, method="encode_text")
    return image, text, model.apply(v, x, ids)

  return jax.jit(run)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32))


def _check_all(got, want, what: str) -> None:
  for name, g, w in zip(("image", "text", "logits"), got, want, strict=True):
    _close(g, w, f"{what} {name}")


@pytest.fixture(scope="module")
def oc_tiny():
  """A tiny open_clip QuickGELU CLIP with random weights and its state dict (numpy)."""
  model = _randomize(_open_clip_model("tiny"))
  return model, bp.state(model)


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quickgelu", "gelu"])
def test_open_clip_parity_tiny(tmp_path, quick_gelu):
  model = _randomize(_open_clip_model("tiny", quick_gelu=quick_gelu), seed=1)
  torch.save(model.state_dict(), tmp_path / "open_clip.pt")
  variables = clip.convert_open_clip(load_state_dict(tmp_path / "open_clip.pt"), "tiny")
  x, ids = _inputs("tiny")
  got = _jax_outputs(clip.create_clip("tiny", quick_gelu=quick_gelu), variables, x, ids)
  _check_all(got, _torch_outputs(model, x, ids), f"open_clip tiny {quick_gelu=}")


def test_hf_parity_tiny(tmp_path):
  from safetensors.torch import save_file

  model = _hf_model("tiny")
  save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
  variables = clip.convert_hf(load_state_dict(tmp_path / "model.safetensors"), "tiny")
  x, ids = _inputs("tiny", seed=2)
  with torch.no_grad():
    xt, it = torch.from_numpy(x), torch.from_numpy(ids)
    image = model.visual_projection(model.vision_model(pixel_values=xt).pooler_output)
    text = model.text_projection(model.text_model(input_ids=it).pooler_output)
    logits = model(input_ids=it, pixel_values=xt).logits_per_image
  want = image.numpy(), text.numpy(), logits.numpy()
  _check_all(_jax_outputs(clip.create_clip("tiny"), variables, x, ids), want, "HF tiny")


def test_openai_fp16_state_dict_through_the_cli(tmp_path, oc_tiny):
  """A plain fp16 state dict (what ``torch.load`` reads), with the archive's size entries:
  loads as float32 holding exactly the fp16 values, and matches the fp16-rounded model."""
  model, _ = oc_tiny
  half = {k: v.half() for k, v in model.state_dict().items()}
  half |= dict(input_resolution=torch.tensor(32), context_length=torch.tensor(77))
  torch.save(half | dict(vocab_size=torch.tensor(49408)), tmp_path / "ViT-tiny.pt")
  out = tmp_path / "clip.npz"
  argv = ["--family", "clip", "--variant", "tiny", "--source", "openai"]
  assert convert.main([*argv, "--input", str(tmp_path / "ViT-tiny.pt"), "--output", str(out)]) == 0
  variables, meta = load_variables(out)
  assert meta["preprocessing"]["mean"] == list(clip.CLIP_MEAN)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype("float32")}
  conv1 = variables["params"]["visual"]["conv1"]["kernel"]
  np.testing.assert_array_equal(
    conv1, half["visual.conv1.weight"].float().numpy().transpose(2, 3, 1, 0)
  )
  rounded = _open_clip_model("tiny")
  rounded.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
  rounded.half().float()
  x, ids = _inputs("tiny", seed=3)
  got = _jax_outputs(clip.create_clip("tiny"), variables, x, ids)
  _check_all(got, _torch_outputs(rounded, x, ids), "openai fp16 tiny")
  with pytest.raises(WeightMappingError, match="input_resolution is 224, CLIP 'tiny' has 32"):
    clip.convert_openai(bp.state(model) | dict(input_resolution=np.array(224)), "tiny")


def test_load_openai_reads_a_torchscript_archive(tmp_path, oc_tiny):
  """OpenAI ships TorchScript: the same fp16 tensors in a scripted module load as float32."""
  _, sd = oc_tiny
  root = torch.nn.Module()
  for key, value in sd.items():
    *parents, leaf = key.split(".")
    node = root
    for name in parents:
      if not hasattr(node, name):
        node.add_module(name, torch.nn.Module())
      node = getattr(node, name)
    node.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(value).half()))
  root.register_buffer("input_resolution", torch.tensor(32))
  with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's files still use it
    warnings.simplefilter("ignore", FutureWarning)
    torch.jit.save(torch.jit.script(root), str(tmp_path / "ViT-tiny.pt"))
  loaded = clip.load_openai(tmp_path / "ViT-tiny.pt")
  assert loaded.keys() == sd.keys() | {"input_resolution"}
  assert loaded["visual.proj"].dtype == np.float32
  np.testing.assert_array_equal(loaded["visual.proj"], sd["visual.proj"].astype(np.float16))
  variables = clip.convert_openai(loaded, "tiny")
  assert variables["params"]["logit_scale"].dtype == np.float32
  # The conversion CLI reads the archive too (``convert`` uses the family's ``load_openai``).
  out = tmp_path / "clip.npz"
  argv = ["--family", "clip", "--variant", "tiny", "--source", "openai", "--num-classes", "0"]
  assert convert.main([*argv, "--input", str(tmp_path / "ViT-tiny.pt"), "--output", str(out)]) == 0
  converted, _ = load_variables(out)  # the image tower alone: its keys at the top level
  want = sd["visual.proj"].astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(converted["params"]["proj"], want)


def test_strict_mapping_names_bad_keys(oc_tiny):
  _, sd = oc_tiny
  key = "visual.transformer.resblocks.1.attn.in_proj_bias"
  with pytest.raises(WeightMappingError, match=rf"missing key '{key}'"):
    clip.convert_open_clip({k: v for k, v in sd.items() if k != key}, "tiny")
  with pytest.raises(WeightMappingError, match=r"unexpected key.*transformer\.resblocks\.0\.ls_1"):
    clip.convert_open_clip(sd | {"transformer.resblocks.0.ls_1.gamma": np.ones(32)}, "tiny")
  bad = sd | {"positional_embedding": np.zeros((76, 32), np.float32)}
  with pytest.raises(WeightMappingError, match=r"shape mismatch for 'positional_embedding'"):
    clip.convert_open_clip(bad, "tiny")
  with pytest.raises(WeightMappingError, match="shape mismatch for 'visual.conv1.weight'"):
    clip.convert_open_clip(sd, "vit_b16")  # the variant must fit the checkpoint
  with pytest.raises(ValueError, match="no classifier"):
    clip.convert_open_clip(sd, "tiny", num_classes=2)
  ddp = {f"module.{k}": v for k, v in sd.items()}
  assert jax.tree.structure(clip.convert_open_clip(ddp, "tiny")) == jax.tree.structure(
    clip.convert_open_clip(sd, "tiny")
  )


def test_strict_hf_mapping_names_hf_keys():
  sd = bp.state(_hf_model("tiny"))
  key = "vision_model.encoder.layers.0.self_attn.k_proj.weight"
  with pytest.raises(WeightMappingError, match=rf"missing key '{key}'"):
    clip.convert_hf({k: v for k, v in sd.items() if k != key}, "tiny")
  with pytest.raises(WeightMappingError, match=r"unexpected key.*vision_model\.head\.weight"):
    clip.convert_hf(sd | {"vision_model.head.weight": np.ones(3)}, "tiny")
  bad = sd | {"visual_projection.weight": np.zeros((32, 63), np.float32)}
  with pytest.raises(WeightMappingError, match=r"shape mismatch for 'visual_projection\.weight'"):
    clip.convert_hf(bad, "tiny")
  ids = {
    f"{t}_model.embeddings.position_ids": np.arange(n)[None]
    for t, n in (("vision", 17), ("text", 77))
  }
  clip.convert_hf(sd | ids, "tiny")  # older files hold the position-id buffers
  with pytest.raises(WeightMappingError, match="vision_model.embeddings.position_ids"):
    clip.convert_hf(sd | ids | {"vision_model.embeddings.position_ids": np.zeros((1, 17))}, "tiny")
  vision = clip.convert_hf(
    {k: v for k, v in sd.items() if not k.startswith("text")}, "tiny", num_classes=0
  )
  assert set(vision["params"]) == {
    "conv1",
    "class_embedding",
    "positional_embedding",
    "ln_pre",
    "transformer",
    "ln_post",
    "proj",
  }


def test_return_layers_match_the_torch_blocks(oc_tiny):
  model, sd = oc_tiny
  variables = clip.convert_open_clip(sd, "tiny")
  x, ids = _inputs("tiny", seed=4)
  seen: dict[str, np.ndarray] = {}
  hooks = [
    block.register_forward_hook(
      lambda m, a, out, name=f"{tower}{i}": seen.__setitem__(name, out.numpy())
    )
    for tower, blocks in (
      ("visual", model.visual.transformer.resblocks),
      ("text", model.transformer.resblocks),
    )
    for i, block in enumerate(blocks)
  ]
  want = _torch_outputs(model, x, ids)
  for h in hooks:
    h.remove()
  flax_model = clip.create_clip("tiny")

  def run(v, x, ids):
    image = flax_model.apply(v, x, method="encode_image", return_layers=(1, 0))
    text = flax_model.apply(v, ids, method="encode_text", return_layers=(0, 1))
    return image, text

  (image, (v1, v0)), (text, (t0, t1)) = jax.jit(run)(
    variables, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32)
  )
  _close(image, want[0], "return_layers image")
  _close(text, want[1], "return_layers text")
  for name, got in dict(visual0=v0, visual1=v1, text0=t0, text1=t1).items():
    _close(got, seen[name], f"block output {name}")
  with pytest.raises(ValueError, match=r"return_layers \[2\] out of range"):
    clip.create("tiny").apply(
      {"params": variables["params"]["visual"]}, jnp.zeros((1, 32, 32, 3)), return_layers=(2,)
    )


def test_token_embeds_replace_the_lookup(oc_tiny):
  _, sd = oc_tiny
  text = clip.convert_open_clip(sd, "tiny")["params"]["text"]
  tower = clip.create_clip("tiny").text
  _, ids = _inputs("tiny", seed=5)
  ids = jnp.asarray(ids, jnp.int32)
  table = text["token_embedding"]["embedding"]
  run = jax.jit(
    lambda p, ids, e: (
      tower.apply({"params": p}, ids),
      tower.apply({"params": p}, ids, token_embeds=e),
    )
  )
  plain, replaced = run(text, ids, table[ids])
  np.testing.assert_allclose(replaced, plain, rtol=1e-6, atol=1e-6)


def test_resampled_input_size_matches_open_clip_resize(oc_tiny):
  """48 px with weights of 32 px: the 4x4 position grid resampled to 6x6 as open_clip does."""
  _, sd = oc_tiny
  big = _open_clip_model("tiny", image_size=48)
  resized = {k: torch.from_numpy(v) for k, v in sd.items()}
  open_clip.model.resize_pos_embed(resized, big)
  big.load_state_dict(resized)
  x = np.random.default_rng(6).normal(size=(2, 3, 48, 48)).astype(np.float32)
  with torch.no_grad():
    want = big.encode_image(torch.from_numpy(x)).numpy()
  vision = clip.convert_open_clip(sd, "tiny", num_classes=0)
  got = bp.apply(clip.create("tiny"), vision, jnp.asarray(x.transpose(0, 2, 3, 1)))
  _close(got, want, "open_clip tiny @48px")
  with pytest.raises(ValueError, match="not a positive multiple of its 8 px patch"):
    clip.create("tiny").init(jax.random.key(0), jnp.zeros((1, 36, 36, 3)))


def test_image_tower_as_detector_backbone(tmp_path, oc_tiny):
  """Converted with --num-classes 0, loaded by ``detector.init_variables``: one logit per image,
  and the backbone's pooled feature is open_clip's image embedding of the normalised input."""
  model, _ = oc_tiny
  torch.save(model.state_dict(), tmp_path / "oc.pt")
  out = tmp_path / "vision.npz"
  argv = ["--family", "clip", "--variant", "tiny", "--source", "open_clip", "--num-classes", "0"]
  assert convert.main([*argv, "--input", str(tmp_path / "oc.pt"), "--output", str(out)]) == 0
  config = ml_collections.ConfigDict(
    dict(
      model=dict(
        name="clip",
        variant="tiny",
        dtype="float32",
        init=str(out),
        projection_dims=(16,),
        dropout=0.0,
      ),
      data=dict(image_size=32),
    )
  )
  det = detector.build(config)
  variables = detector.init_variables(det, config, seed=0)
  images = np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  logits, state = jax.jit(lambda v, x: det.apply(v, x, mutable=["intermediates"]))(
    variables, images
  )
  assert logits.shape == (3,) and np.all(np.isfinite(logits))
  x = (images / 255.0 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  with torch.no_grad():
    want = model.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
  _close(state["intermediates"]["pooled"][0], want, "Detector pooled")
  assert clip.num_features("tiny") == want.shape[1]


def test_norm_factory_builds_the_block_norms_only():
  norm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_bias=False)
  shapes = clip.abstract_clip("tiny")["params"]
  plain = jax.eval_shape(
    lambda: clip.create("tiny", norm=norm).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  )
  block = plain["params"]["transformer"]["resblocks_0"]
  assert set(block["ln_1"]) == set(block["ln_2"]) == {"scale"}
  assert set(plain["params"]["ln_pre"]) == {"scale", "bias"}
  assert set(shapes["visual"]["transformer"]["resblocks_0"]["ln_1"]) == {"scale", "bias"}


def test_bfloat16_compute_float32_params(oc_tiny):
  vision = clip.convert_open_clip(oc_tiny[1], "tiny", num_classes=0)
  x = jnp.zeros((1, 32, 32, 3))
  model = clip.create("tiny", dtype=jnp.bfloat16)
  assert bp.matmul_dtypes(model, vision, x) == {"bfloat16"}
  assert jax.eval_shape(model.apply, vision, x).dtype == jnp.bfloat16
  assert bp.matmul_dtypes(clip.create("tiny"), vision, x) == {"float32"}


@pytest.mark.parametrize("variant", ["vit_b32", "vit_b16", "vit_l14", "vit_l14_336"])
def test_full_size_parameter_counts(variant):
  with torch.device("meta"):
    reference = _open_clip_model(variant)
  counted = param_count(clip.abstract_clip(variant)["params"])
  assert counted == sum(p.numel() for p in reference.parameters())
  if variant == "vit_b16":
    assert counted == 149_620_737  # OpenAI ViT-B/16
  pre = clip.preprocessing(variant)
  assert (pre["mean"], pre["std"]) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
  assert pre["input_size"] == reference.visual.image_size[0]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["open_clip", "hf"])
def test_full_size_parity_vit_b16(source):
  """ViT-B/16 with each reference's own random initialisation (12 blocks of random +-0.2
  weights would saturate), both towers."""
  torch.manual_seed(0)
  x, ids = _inputs("vit_b16", lengths=(7, 77))
  if source == "open_clip":
    model = _open_clip_model("vit_b16")
    variables = clip.convert_open_clip(bp.state(model), "vit_b16")
    want = _torch_outputs(model, x, ids)
  else:
    model = _hf_model("vit_b16", randomize=False)
    variables = clip.convert_hf(bp.state(model), "vit_b16")
    with torch.no_grad():
      xt, it = torch.from_numpy(x), torch.from_numpy(ids)
      want = (
        model.visual_projection(model.vision_model(pixel_values=xt).pooler_output).numpy(),
        model.text_projection(model.text_model(input_ids=it).pooler_output).numpy(),
        model(input_ids=it, pixel_values=xt).logits_per_image.numpy(),
      )
  _check_all(
    _jax_outputs(clip.create_clip("vit_b16"), variables, x, ids), want, f"{source} ViT-B/16"
  )
