"""GM-DF, the multi-dataset CLIP detector (Lai et al., ACM MM 2025, Sec. 3): the method on the
contract. The model side (the expert branches, DNorm, the second-order aggregation, the prompts,
L_sis, MIM) is ``csdfd_jax.models.gmdf``; this module holds the Meta-Domain-Embedding Optimizer
(Eq. 12-15), the domain-alignment loss and the step's gradients. ``configs/gmdf.py`` holds the
protocols.

Per step one domain is the meta-test domain and the others are meta-train (``meta_split``; the
paper's Eq. 13 text calls the meta-train set "meta-test", a typo). With theta_E the expert and
domain parameters, theta_O the rest (the base), L_S the classification loss on the meta-train
domains (Eq. 12) and L_T the total loss on the meta-test domain (Eq. 14):

    inner (Eq. 13):  theta'_E = theta_E - beta grad_E L_S(theta_E, theta_O)        (committed)
    outer (Eq. 15):  g_O = d/d theta_O of L_T(theta'_E, theta_O)

Eq. 15 writes a partial derivative with theta_E as a separate argument, so the literal reading is
first order: theta'_E is a constant of the outer gradient (``order=1``, the default). Exact MAML
(``order=2``) adds the path through the inner step:

    g_O = grad_O L_T(theta'_E, theta_O) - beta D_E[grad_O L_S](theta_E, theta_O)[v],
    v = grad_E L_T(theta'_E, theta_O),

where the mixed term is one forward-over-reverse product (a ``jax.jvp`` of ``grad_O L_S`` along
v; by the symmetry of mixed partials it is the transpose of the mixed Hessian block applied to
v). The outer loop does not update theta_E (the paper: "theta_E is updated during meta-train,
theta_O during meta-test"). ``../shared/notes/peers.md`` 3.5 items 13-15 and 3.6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from csdfd_jax.data.pipeline import Select, StreamSpec, default_spec
from csdfd_jax.methods import Method
from csdfd_jax.methods.step import GradFn, Gradients, stack_batch, tree_axpy, tree_norm
from csdfd_jax.models import gmdf as gmdf_model
from csdfd_jax.transforms import sum_streams

Params = Any
LossFn = Callable[[Params, Params], jax.Array]  # (theta_E, theta_O) -> scalar


class MetaGradients(NamedTuple):
  """new_e: theta'_E after the inner step; grad_o: the outer gradient g_O; loss_train: L_S at
  (theta_E, theta_O); loss_test: L_T at (theta'_E, theta_O); step_norm: ||theta'_E - theta_E||."""

  new_e: Params
  grad_o: Params
  loss_train: jax.Array
  loss_test: jax.Array
  step_norm: jax.Array
  grad_e: Params = None  # the inner gradient: theta'_E = theta_E - inner_lr * grad_e
  aux: Any = None  # (aux_train, aux_test) with has_aux


def meta_split(rng: jax.Array, num_domains: int) -> tuple[jax.Array, jax.Array]:
  """(meta-test index [], meta-train indices [num_domains - 1]): a random permutation of the
  domain axis, its first entry the meta-test domain. Static shapes, so the step compiles once."""
  if num_domains < 2:
    raise ValueError(
      f"GM-DF's meta split needs at least 2 domains, got {num_domains}: with one source dataset, "
      "declare its manipulation types as the domains"
    )
  order = jax.random.permutation(rng, num_domains)
  return order[0], order[1:]


def meta_gradients(
  loss_train: LossFn,
  loss_test: LossFn,
  params_e: Params,
  params_o: Params,
  inner_lr: float,
  order: int = 1,
  *,
  has_aux: bool = False,
) -> MetaGradients:
  """The inner SGD step on theta_E (Eq. 13) and the outer gradient on theta_O (Eq. 15), first
  order (the paper's partial derivative) or second order (exact MAML). With ``has_aux``,
  ``loss_train(e, o)`` returns ``(loss, aux_train)`` and ``loss_test(e, o, aux_train)`` returns
  ``(loss, aux_test)`` (the meta-test loss may read the meta-train pass, as a constant: the
  domain-alignment loss does); ``aux`` is then ``(aux_train, aux_test)``."""
  if order not in (1, 2):
    raise ValueError(f"order must be 1 (first-order, Eq. 15 literally) or 2 (exact), got {order}")
  if has_aux:
    (loss_s, aux_s), grad_e = jax.value_and_grad(loss_train, has_aux=True)(params_e, params_o)
    aux_s = jax.lax.stop_gradient(aux_s)
    test = lambda e, o: loss_test(e, o, aux_s)  # noqa: E731
    train_only = lambda e, o: loss_train(e, o)[0]  # noqa: E731
  else:
    loss_s, grad_e = jax.value_and_grad(loss_train, argnums=0)(params_e, params_o)
    aux_s, test, train_only = None, (lambda e, o: (loss_test(e, o), None)), loss_train
  new_e = tree_axpy(-inner_lr, grad_e, params_e)
  (loss_t, aux_t), (v, grad_o) = jax.value_and_grad(test, argnums=(0, 1), has_aux=True)(
    new_e, params_o
  )
  if order == 2:

    def grad_o_train(e):
      return jax.grad(train_only, argnums=1)(e, params_o)

    _, mixed = jax.jvp(grad_o_train, (params_e,), (v,))
    grad_o = tree_axpy(-inner_lr, mixed, grad_o)
  step = jax.tree.map(lambda a, b: a - b, new_e, params_e)
  aux = (aux_s, aux_t) if has_aux else None
  return MetaGradients(new_e, grad_o, loss_s, loss_t, tree_norm(step), grad_e, aux)


def domain_dropout(rng: jax.Array, domain_ids: jax.Array, prob: float) -> jax.Array:
  """Replaces each sample's domain id (1..D) by the wildcard 0 with probability ``prob``, which
  trains the wildcard path that unseen test domains use (the paper never says how it is
  trained; notes 3.5 item 5)."""
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"wildcard probability must be in [0, 1], got {prob}")
  drop = jax.random.bernoulli(rng, prob, domain_ids.shape)
  return jnp.where(drop, 0, domain_ids)


def coral(source: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """The domain-alignment loss (the arXiv version's "DA loss", notes 3.5 item 12; Deep CORAL,
  Sun & Saenko 2016, plus the mean term): ||mu_S - mu_T||^2 + ||C_S - C_T||_F^2 / (4 d^2) for
  features [n, d] (unbiased covariances)."""
  d = source.shape[-1]

  def moments(x):
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=0)
    c = x - mu
    return mu, c.T @ c / jnp.maximum(x.shape[0] - 1, 1)

  (mu_s, c_s), (mu_t, c_t) = moments(source), moments(target)
  return jnp.sum(jnp.square(mu_s - mu_t)) + jnp.sum(jnp.square(c_s - c_t)) / (4.0 * d * d)


def _unit(v):
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _bce(logits, labels):
  labels = labels.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
  return loss, jnp.mean((logits > 0) == (labels > 0.5))


class Options(NamedTuple):
  """``config.gmdf``'s training settings (the model's are read by ``models.detector``)."""

  inner_lr: float = 1e-3  # beta (Eq. 13), not given by the paper (notes 3.5 item 14)
  maml_order: int = 1
  wildcard_prob: float = 0.2
  sis: str = "paper+wildcard"
  lambda_cls: float = 1.0
  lambda_sis: float = 1.0
  lambda_mim: float = 1.0
  lambda_da: float = 1.0
  mim_ratio: float = 0.2
  freeze_text: bool = True


def _split(params, labels, group):
  """``params`` with the leaves of other groups replaced by None (an empty subtree)."""
  return jax.tree.map(lambda p, lab: p if lab == group else None, params, labels)


def _merge(*trees):
  """Leafwise the one non-None value of the trees (the groups partition the parameters)."""
  return jax.tree.map(
    lambda *xs: next(x for x in xs if x is not None), *trees, is_leaf=lambda x: x is None
  )


def gmdf_gradients(model: nn.Module, streams: tuple[str, ...], opts: Options) -> GradFn:
  """The ``GradFn`` of GM-DF's step over the K domain streams (K >= 2), stacked [1, ...]:

  1. a random meta-test domain t, the others meta-train (``meta_split``); every sample's domain
     id (its stream's ``domain`` field, 1..K) goes to the wildcard 0 with ``wildcard_prob``;
  2. inner (Eq. 12-13): L_S = the BCE of the prompt-head logit on the meta-train samples;
     theta'_E = theta_E - beta grad_E L_S;
  3. outer (Eq. 14-15) on the meta-test samples at (theta'_E, theta_O): L_T = lambda_cls L_cls +
     lambda_sis L_sis + lambda_mim L_mim + lambda_da L_da (L_da: ``coral`` between the
     meta-test image embeddings and the meta-train ones of step 2, held constant; both
     L2-normalised, as the prompt head and L_sis read them only through cosines, so the loss
     does not grow with the embedding's scale);
  4. the gradient tree holds grad_E L_S on theta_E's leaves (the method's optimizer applies
     SGD(beta) there: the committed inner step), g_O on theta_O's (the base optimizer, Adam) and
     zeros on the frozen text tower.

  ``loss/meta`` is L_T; ``loss/{inner_cls,cls,sis,mim,da}`` its parts and L_S."""
  k = len(streams)

  def gradients(params, model_state, batch, rng) -> Gradients:
    stacked = stack_batch(batch, streams)  # {field: [K, B, ...]}
    if "domain" not in stacked:
      raise ValueError("GM-DF's streams must carry a domain id (StreamSpec.domain_id)")
    r_split, r_drop, r_mask = jax.random.split(rng, 3)
    test, train = meta_split(r_split, k)
    stacked["domain"] = domain_dropout(r_drop, stacked["domain"], opts.wildcard_prob)

    def take(index):
      part = jax.tree.map(lambda x: jnp.take(x, index, axis=0), stacked)
      return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), part) if index.ndim else part

    tr, te = take(train), take(test)
    labels = gmdf_model.param_labels(params, freeze_text=opts.freeze_text)
    p_e, p_o, p_f = (_split(params, labels, g) for g in gmdf_model.GROUPS)

    def full(e, o):
      return _merge(e, o, jax.lax.stop_gradient(p_f))

    def loss_train(e, o):
      logit, aux = model.apply(
        {"params": full(e, o)}, tr["image"], domain_ids=tr["domain"], aux=True
      )
      loss, acc = _bce(logit, tr["label"])
      return loss, {"v": aux["v"], "accuracy": acc, "branch_rms": aux["branch_rms"]}

    def loss_test(e, o, aux_train):
      variables = {"params": full(e, o)}
      logit, aux = model.apply(variables, te["image"], domain_ids=te["domain"], aux=True)
      cls, acc = _bce(logit, te["label"])
      parts = {"cls": cls}
      parts["sis"] = gmdf_model.sis_loss(
        aux["v"], aux["u"], te["domain"], te["label"], aux["tau"], opts.sis
      )
      if opts.lambda_mim:
        grid = te["image"].shape[1] // model.patch_size
        mask = gmdf_model.random_mask(r_mask, te["image"].shape[0], grid * grid, opts.mim_ratio)
        parts["mim"] = model.apply(
          variables, te["image"], mask, te["domain"], method=type(model).mim_loss
        )
      if opts.lambda_da:
        parts["da"] = coral(_unit(aux["v"]), _unit(aux_train["v"]))
      weights = {"cls": opts.lambda_cls, "sis": opts.lambda_sis, "mim": opts.lambda_mim}
      weights["da"] = opts.lambda_da
      total = sum(weights[n] * v for n, v in parts.items())
      return total, {"parts": parts, "accuracy": acc, "tau": aux["tau"]}

    meta = meta_gradients(
      loss_train, loss_test, p_e, p_o, opts.inner_lr, opts.maml_order, has_aux=True
    )
    aux_s, aux_t = meta.aux
    zeros_f = jax.tree.map(jnp.zeros_like, p_f)
    grads = _merge(meta.grad_e, meta.grad_o, zeros_f)
    metrics = {f"loss/{n}": v for n, v in aux_t["parts"].items()}
    metrics["loss/inner_cls"] = meta.loss_train
    metrics["accuracy/meta_train"] = aux_s["accuracy"]
    metrics["accuracy/meta_test"] = aux_t["accuracy"]
    metrics["gmdf/dE_norm"] = meta.step_norm
    metrics["gmdf/expert_rms"] = aux_s["branch_rms"]
    metrics["gmdf/meta_test"] = test.astype(jnp.float32)
    for j, name in enumerate(("wildcard", *streams)):
      metrics[f"gmdf/tau/{name}"] = aux_t["tau"][j]
    for j, layer in enumerate(model.so_layers):
      metrics[f"gmdf/alpha_so/{layer + 1}"] = params["so_alpha"][j]
    stacked_grads = jax.tree.map(lambda x: x[None], grads)
    return Gradients(stacked_grads, meta.loss_test[None], model_state, metrics)

  return gradients


DOMAIN_KINDS = ("dataset", "manipulation", "stream")


def domain_specs(config) -> tuple[StreamSpec, ...]:
  """One stream per training domain of ``config.gmdf.domains`` (comma-separated), domain ids
  1..D in that order (0 is the wildcard). ``config.gmdf.domain_kind`` says what a name is:
  "dataset" (the records' ``dataset`` column: that dataset's reals and fakes; GM-DF's
  multi-dataset protocol), "manipulation" (the fakes of that manipulation type with the
  records' reals: the FF++ manipulations as domains of the single-source protocol), or
  "stream" (a stream name of ``pipeline.default_spec``: the demo's o and s)."""
  g = config.gmdf
  names = tuple(n.strip() for n in g.domains.split(",") if n.strip())
  if len(names) < 2 or len(set(names)) != len(names):
    raise ValueError(
      f"config.gmdf.domains={g.domains!r}: GM-DF needs at least two distinct training domains "
      "(with one source dataset, use its manipulation types: configs/gmdf.py:single_ffpp)"
    )
  if g.domain_kind not in DOMAIN_KINDS:
    raise ValueError(f"config.gmdf.domain_kind={g.domain_kind!r}; valid: {', '.join(DOMAIN_KINDS)}")
  specs = []
  for i, name in enumerate(names, start=1):
    if g.domain_kind == "dataset":
      spec = StreamSpec(name, fakes=Select(datasets=(name,)), reals=Select(datasets=(name,)))
    elif g.domain_kind == "manipulation":
      spec = StreamSpec(name, fakes=Select(domains=(name,)))
    else:
      spec = default_spec(name)
    specs.append(spec._replace(domain_id=i))
  return tuple(specs)


def options(config) -> Options:
  g = config.gmdf
  opts = Options(
    inner_lr=float(g.inner_lr),
    maml_order=int(g.maml_order),
    wildcard_prob=float(g.wildcard_prob),
    sis=g.sis,
    lambda_cls=float(g.lambda_cls),
    lambda_sis=float(g.lambda_sis),
    lambda_mim=float(g.lambda_mim),
    lambda_da=float(g.lambda_da),
    mim_ratio=float(g.mim_ratio),
    freeze_text=bool(g.freeze_text),
  )
  if opts.maml_order not in (1, 2):
    raise ValueError(f"config.gmdf.maml_order={opts.maml_order}: 1 (Eq. 15 literally) or 2")
  if opts.sis not in gmdf_model.SIS:
    raise ValueError(f"config.gmdf.sis={opts.sis!r}; valid: {', '.join(gmdf_model.SIS)}")
  if not 0.0 <= opts.wildcard_prob <= 1.0:
    raise ValueError(f"config.gmdf.wildcard_prob={opts.wildcard_prob} must be in [0, 1]")
  for key in ("inner_lr", "lambda_cls", "lambda_sis", "lambda_mim", "lambda_da"):
    if getattr(opts, key) < 0:
      raise ValueError(f"config.gmdf.{key}={getattr(opts, key)} must be >= 0")
  if opts.lambda_mim and not 0.0 < opts.mim_ratio < 1.0:
    raise ValueError(f"config.gmdf.mim_ratio={opts.mim_ratio} must be in (0, 1)")
  if g.mim_target != "norm_pixels":
    raise ValueError(
      f"config.gmdf.mim_target={g.mim_target!r}: only 'norm_pixels' is implemented (the "
      "paper's dVAE tokenizer is not available offline; notes 3.5 item 11)"
    )
  return opts


def build(name: str, config) -> Method:
  """GM-DF over ``config.gmdf.domains`` (``configs/gmdf.py``); the model must be the GMDF
  detector (``config.model.detector = "gmdf"``)."""
  if "gmdf" not in config or config.model.get("detector", "") != "gmdf":
    raise ValueError(
      "method 'gmdf' needs the GM-DF detector and its settings: use configs/gmdf.py "
      "(config.model.detector = 'gmdf' and a config.gmdf section)"
    )
  specs = domain_specs(config)
  opts = options(config)
  streams = tuple(s.name for s in specs)

  def optimizer(base: optax.GradientTransformation) -> optax.GradientTransformation:
    def labels(params):
      return gmdf_model.param_labels(params, freeze_text=opts.freeze_text)

    groups = {gmdf_model.E: optax.sgd(opts.inner_lr), gmdf_model.O: base}
    groups[gmdf_model.FROZEN] = optax.set_to_zero()
    return optax.partition(groups, labels)

  return Method(
    name,
    streams,
    sum_streams("sum"),
    lambda model: gmdf_gradients(model, streams, opts),
    specs=specs,
    axes=("meta",),
    optimizer=optimizer,
  )
