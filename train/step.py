"""The optimizer, the sharded train state and the pure train / eval / diagnostics steps.

`Trainer(cfg, mesh)` builds:
  tx            Muon (hidden matrices) + AdamW (rest), or AdamW alone; both behind global-norm
                clipping and the WSD schedule.
  shardings     parameters through the model's logical names and train.mesh.RULES; optimizer
                state leaves like their parameter; batches over data x fsdp.
  init_state    jitted with out_shardings: parameters are created already sharded.
  train_step    jitted ONCE with in_shardings / out_shardings and the state donated:
                (state, batch [A, B/A, T]) -> (state, metrics). A = grad_accum micro-batches
                run in a lax.scan; the loss is a token-weighted sum over all of them, so
                accumulation equals the full batch. Compute dtype is the model config's
                (bfloat16 for the GPU presets); parameters and optimizer state stay float32.
                The LM head + loss run fused and chunked (`optimizer.loss_chunk_tokens`;
                parallax_jax.nn.losses), so no [tokens, vocab] logits are materialized.
  eval_step     summed NLL and token count of one batch, [A, B/A, T] micro-batch by micro-batch
                as training splits it (so evaluation never needs more memory than a step).
  diagnostics   COR per layer, stable ranks of W_Q / W_R and the mean correction gate per
                layer (when the gate is on), on one batch.
"""
from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from parallax_jax import diagnostics as pdiag
from parallax_jax.models import Qwen3Model, init_params, logical_param_specs
from parallax_jax.nn.losses import chunked_cross_entropy, fused_cross_entropy
from parallax_jax.optim import muon, stable_ranks
from train import mesh as mesh_lib
from train.config import TrainConfig
from train.schedule import wsd

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def make_optimizer(cfg: TrainConfig):
  """(tx, unit schedule): the optimizer with the schedule's shape at peak 1. Its updates are
  linear in the learning rate, so the step multiplies them by the peak lr, a traced argument:
  runs that differ only in lr compile to one program (the persistent compilation cache then
  serves a learning-rate sweep). A separate `adam_lr` enters as its ratio to `lr`."""
  oc = cfg.optimizer
  lr = wsd(1.0, cfg.run.steps, cfg.schedule)
  adam_lr = lr if oc.adam_lr is None else wsd(oc.adam_lr / oc.lr, cfg.run.steps, cfg.schedule)
  if oc.name == "muon":
    tx = muon(lr, weight_decay=oc.weight_decay, adam_learning_rate=adam_lr, adam_b1=oc.b1,
              adam_b2=oc.b2, adam_eps=oc.eps, adam_weight_decay=oc.adam_weight_decay,
              per_head=oc.per_head, beta=oc.muon_beta, update_scale=oc.muon_update_scale,
              rms=oc.muon_rms)
  else:
    tx = optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
  if oc.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(oc.clip_grad_norm), tx)
  return tx, lr


def token_nll(logits, targets):
  """Per-token (NLL, log Z), float32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked, logz


def token_losses(logits, targets, mask):
  """(sum of NLL, sum of log(Z)^2, token count) over masked positions, float32."""
  nll, logz = token_nll(logits, targets)
  m = mask.astype(jnp.float32)
  return jnp.sum(nll * m), jnp.sum(jnp.square(logz) * m), jnp.sum(m)


# rows longer than this skip the repeat split of the eval loss (its test is [L, L] per row)
REPEAT_SPLIT_MAX_LEN = 8192


def repeat_targets(inputs, targets, segment_ids):
  """[B, L] bool: the target at t repeats a bigram seen earlier in its document (some s < t
  in the same segment has inputs[s] == inputs[t] and targets[s] == targets[t]), so copying
  what followed the last occurrence of this token, as an induction head does, predicts it."""
  length = inputs.shape[1]
  pairs = ((inputs[:, :, None] == inputs[:, None, :])
           & (targets[:, :, None] == targets[:, None, :])
           & (segment_ids[:, :, None] == segment_ids[:, None, :]))
  earlier = jnp.tril(jnp.ones((length, length), jnp.bool_), k=-1)  # [t, s]: s < t
  return jnp.any(pairs & earlier, axis=-1) & (segment_ids != 0)


class Trainer:
  def __init__(self, cfg: TrainConfig, mesh):
    self.cfg, self.mesh = cfg, mesh
    self.model = Qwen3Model(cfg.model)
    self.tx, self.unit_schedule = make_optimizer(cfg)
    with self.context():
      abstract = jax.eval_shape(functools.partial(init_params, cfg.model), jax.random.key(0))
      self.params_abstract = abstract
      self.param_shardings = mesh_lib.logical_to_sharding(
          logical_param_specs(cfg.model), abstract, mesh)
      opt_abstract = jax.eval_shape(self.tx.init, abstract)
      self.opt_shardings = mesh_lib.state_like_params_sharding(
          opt_abstract, self.param_shardings, abstract, mesh)
    rep = mesh_lib.replicated(mesh)
    self.peak_lr = jax.device_put(np.float32(cfg.optimizer.lr), rep)
    self.state_shardings = {"step": rep, "params": self.param_shardings,
                            "opt_state": self.opt_shardings}
    self.state_abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract,
                           "opt_state": opt_abstract}
    # which slice of the data this process reads: processes holding the same batch shards
    # (a tensor axis across processes) read the same rows
    slices = mesh_lib.batch_slices(mesh)
    self.data_index, self.data_count = slices[jax.process_index()]
    # every process's [index, count], recorded with the data states a checkpoint holds
    self.data_slices = [list(slices[p]) for p in range(jax.process_count())]
    self.batch_shardings = {k: mesh_lib.batch_sharding(mesh, 3, leading=1) for k in BATCH_KEYS}
    self.flat_batch_shardings = {k: mesh_lib.batch_sharding(mesh, 2) for k in BATCH_KEYS}
    self._train_step = jax.jit(self._train_step_impl,
                               in_shardings=(self.state_shardings, self.batch_shardings, rep),
                               out_shardings=(self.state_shardings, rep),
                               donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval_step_impl,
                              in_shardings=(self.param_shardings, self.batch_shardings),
                              out_shardings=rep)
    self._diag = jax.jit(self._diag_impl,
                         in_shardings=(self.param_shardings, self.batch_shardings),
                         out_shardings=rep)
    self._init = jax.jit(self._init_impl, out_shardings=self.state_shardings)
    self._from_params = jax.jit(self._from_params_impl, in_shardings=(self.param_shardings,),
                                out_shardings=self.state_shardings)

  # ------------------------------------------------------------------ context
  def context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(mesh_lib.RULES))
    return stack

  def abstract_state_with_shardings(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.state_abstract, self.state_shardings)

  # ------------------------------------------------------------------ state
  def _init_impl(self, rng):
    params = init_params(self.cfg.model, rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params)}

  def init_state(self, seed: int):
    with self.context():
      return self._init(jax.random.key(seed))

  def fresh_params(self, seed: int):
    """The parameters `init_state(seed)` starts from, without the optimizer state."""
    with self.context():
      return jax.jit(functools.partial(init_params, self.cfg.model),
                     out_shardings=self.param_shardings)(jax.random.key(seed))

  def _from_params_impl(self, params):
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params)}

  def state_from_params(self, params):
    """A new state around given parameters (fine-tuning): fresh optimizer state, step 0."""
    with self.context():
      return self._from_params(params)

  # ------------------------------------------------------------------ steps
  def _hidden(self, params, batch):
    """(final hidden state, head weight, its layout): the input of the chunked losses."""
    return self.model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"], return_hidden=True)

  def _head_loss(self, params, batch, loss_fn):
    """loss_fn over the model's final hidden state and head weight (chunked; no full logits)."""
    x, w, layout = self._hidden(params, batch)
    return loss_fn(x, w, batch["targets"], batch["segment_ids"] != 0,
                   z_loss=self.cfg.optimizer.z_loss, dtype=self.cfg.model.compute_dtype,
                   w_layout=layout, chunk_tokens=self.cfg.optimizer.loss_chunk_tokens)

  def _loss_sums(self, params, mb):
    """(nll + z_loss * zsq, (nll, zsq, tokens)) summed over one micro-batch."""
    if self.cfg.optimizer.loss_chunk_tokens:
      return self._head_loss(params, mb, fused_cross_entropy)
    logits = self.model.apply({"params": params}, mb["inputs"], positions=mb["positions"],
                              segment_ids=mb["segment_ids"])
    nll, zsq, n = token_losses(logits, mb["targets"], mb["segment_ids"] != 0)
    return nll + self.cfg.optimizer.z_loss * zsq, (nll, zsq, n)

  def _train_step_impl(self, state, batch, peak_lr):
    params = state["params"]
    grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
    accum = batch["inputs"].shape[0]
    if accum == 1:
      (_, (nll, zsq, n)), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
    else:
      def body(carry, mb):
        g_acc, s_acc = carry
        (_, sums), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, (nll, zsq, n)), _ = jax.lax.scan(
          body, (zeros, (jnp.float32(0), jnp.float32(0), jnp.float32(0))), batch)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    updates = jax.tree.map(lambda u: (u.astype(jnp.float32) * peak_lr).astype(u.dtype), updates)
    params = optax.apply_updates(params, updates)
    step = state["step"]
    # The norm of the NEW parameters: the loop stops before keeping or saving a state that a
    # non-finite update (a huge lr, an overflow) poisoned, which the loss (computed before
    # the update) cannot show. One fused reduction over the parameters.
    metrics = {"loss": nll / denom, "z_loss": zsq / denom, "grad_norm": grad_norm,
               "param_norm": optax.tree.norm(params),
               "lr": peak_lr * jnp.asarray(self.unit_schedule(step), jnp.float32), "tokens": n}
    return {"step": step + 1, "params": params, "opt_state": opt_state}, metrics

  def train_step(self, state, batch):
    with self.context():
      return self._train_step(state, batch, self.peak_lr)

  def _eval_step_impl(self, params, batch):
    """The sums of `_eval_sums` over the micro-batches of batch [A, B/A, T], one at a time."""
    if batch["inputs"].shape[0] == 1:
      return self._eval_sums(params, jax.tree.map(lambda x: x[0], batch))
    per = jax.lax.map(functools.partial(self._eval_sums, params), batch)
    return {k: jnp.sum(v, axis=0) for k, v in per.items()}

  def _eval_sums(self, params, batch):
    """Summed NLL and token count, and the same over the targets that repeat an earlier
    bigram of their document (`repeat_targets`; rows up to REPEAT_SPLIT_MAX_LEN)."""
    valid = batch["segment_ids"] != 0
    masks = {"": valid}
    if batch["inputs"].shape[1] <= REPEAT_SPLIT_MAX_LEN:
      masks["_repeat"] = repeat_targets(batch["inputs"], batch["targets"],
                                        batch["segment_ids"])
    out = {}
    if self.cfg.optimizer.loss_chunk_tokens:
      # the chunked loss returns sums only, so the split takes a second pass over the LM head
      # (the model body runs once): evaluation only, ~10% of its FLOPs at the study's shape
      x, w, layout = self._hidden(params, batch)
      for k, m in masks.items():
        _, (nll, _, n) = chunked_cross_entropy(
            x, w, batch["targets"], m, dtype=self.cfg.model.compute_dtype, w_layout=layout,
            chunk_tokens=self.cfg.optimizer.loss_chunk_tokens)
        out["nll" + k], out["tokens" + k] = nll, n
      return out
    logits = self.model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
    nll, _ = token_nll(logits, batch["targets"])
    for k, m in masks.items():
      m = m.astype(jnp.float32)
      out["nll" + k], out["tokens" + k] = jnp.sum(nll * m), jnp.sum(m)
    return out

  def eval_step(self, params, batch):
    """`batch`: [B, T] arrays, or [A, B/A, T] (`device_batch(..., accum)`: A micro-batches,
    one at a time, their sums added)."""
    batch = _micro_batches(batch)
    with self.context():
      return self._eval_step(params, batch)

  def _diag_impl(self, params, batch):
    """Stable ranks, and the activation diagnostics (gate, COR) of batch [A, B/A, T]: one
    micro-batch at a time, as training splits it (every layer's q, k, v, r are held at
    once: ~1.4 GB a sequence at 0.6B and L = 4096), averaged over the micro-batches."""
    cfg = self.cfg.model
    out = {}
    for path, sr in stable_ranks(params).items():
      name = path.replace("/kernel", "")
      if sr.ndim and name.startswith("layers/"):  # scanned layers: one key per layer, as unrolled
        for i in range(sr.shape[0]):
          out[f"stable_rank/layers_{i}/" + name[len("layers/"):]] = sr[i]
      else:
        out["stable_rank/" + name] = jnp.mean(sr)
    if not (cfg.has_probe_params or cfg.correction_gate):
      return out
    per = jax.lax.map(functools.partial(self._activation_diag, params), batch)
    out.update({k: jnp.mean(v, axis=0) for k, v in per.items()})
    return out

  def _activation_diag(self, params, batch):
    """Mean gate and COR per layer of one [B, T] batch."""
    cfg = self.cfg.model
    out = {}
    # The attention layers sow q, k, v, r (after norm and RoPE) and the gate outside their
    # shard_map, so these are global arrays on any mesh; a scan stacks them over layers. Remat
    # is off: sown values cannot leave a remat trace.
    model = Qwen3Model(cfg.replace(remat_policy="none"))
    _, inter = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], mutable=["intermediates"])
    inter = inter["intermediates"]
    if cfg.scan_layers:
      sown = {n: x[0] for n, x in inter["layers"]["attn"].items()}  # [L, B, T, H, D]
    else:
      per = [inter[f"layers_{i}"]["attn"] for i in range(cfg.num_layers)]
      sown = {n: jnp.stack([a[n][0] for a in per]) for n in per[0]}
    gate = sown.get("g")  # [L, B, T, Hq]
    if gate is not None:
      g = jnp.mean(gate.astype(jnp.float32), axis=(1, 2, 3))
      out.update({f"gate/layer_{i}": g[i] for i in range(cfg.num_layers)})
    if "r" not in sown:
      return out
    r = sown["r"]
    if gate is not None and cfg.resolved_affine == "affine":
      r = r * gate[..., None].astype(r.dtype)  # what the attention receives: g * r
    # One layer at a time in a loop: one kernel instance of each attention to compile (not
    # 2 x L) and one layer's outputs live at a time.
    def layer_cor(xs, bandwidth=cfg.resolved_bandwidth):
      if cfg.learnable_bandwidth:
        *xs, bandwidth = xs
      return jnp.mean(pdiag.correction_to_output_ratio(
          *xs, causal=True, window=cfg.window, segment_ids=batch["segment_ids"],
          bandwidth=bandwidth))

    xs = (sown["q"], sown["k"], sown["v"], r)
    if cfg.learnable_bandwidth:  # a bandwidth per layer and head
      xs += (jnp.exp(self._layer_params(params, "log_bandwidth").astype(jnp.float32)),)
    cor = jax.lax.map(layer_cor, xs)
    out.update({f"cor/layer_{i}": cor[i] for i in range(cfg.num_layers)})
    return out

  def _layer_params(self, params, name):
    """params[...]["attn"][name] for every layer, stacked [L, ...] (scanned or not)."""
    if self.cfg.model.scan_layers:
      return params["layers"]["attn"][name]
    return jnp.stack([params[f"layers_{i}"]["attn"][name]
                      for i in range(self.cfg.model.num_layers)])

  def diagnostics(self, params, batch):
    """`batch`: [B, T] arrays, or [A, B/A, T] (`device_batch(..., accum)`: A micro-batches,
    one at a time)."""
    batch = _micro_batches(batch)
    with self.context():
      return self._diag(params, batch)

  # ------------------------------------------------------------------ batches
  def device_batch(self, host_batch: dict, accum: int | None = None):
    """Per-process numpy batch [B_local, T] (this process's data slice, `data_index`) ->
    global arrays [B_local * data_count, T]; [A, B/A, T] when accum given."""
    out = {}
    for k in BATCH_KEYS:
      x = host_batch[k]
      if accum is not None:
        x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        sh, rows = self.batch_shardings[k], 1
      else:
        sh, rows = self.flat_batch_shardings[k], 0
      shape = x.shape[:rows] + (x.shape[rows] * self.data_count,) + x.shape[rows + 1:]
      out[k] = jax.make_array_from_process_local_data(sh, x, shape)
    return out


def _micro_batches(batch: dict) -> dict:
  """[B, T] arrays as one micro-batch [1, B, T]; [A, B/A, T] as they are."""
  return {k: v[None] for k, v in batch.items()} if batch["inputs"].ndim == 2 else batch
