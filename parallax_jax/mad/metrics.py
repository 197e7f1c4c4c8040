"""MAD's accuracy and perplexity, in JAX.

MAD scores with `torchmetrics.classification.MulticlassAccuracy(num_classes=vocab_size,
ignore_index=-100)`, whose default `average` is "macro": per class c, recall tp_c / (tp_c +
fn_c) over the positions whose target is not ignored, averaged over the classes that occur
as a target OR as a prediction (tp + fp + fn > 0). A class that is predicted but never a
target therefore counts as 0 (it lowers the mean). Lightning logs the metric's value per test
batch and averages the batches, weighted by batch size; so does `batch_means`.
"Micro" accuracy (correct / scored positions) is reported beside it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from parallax_jax.mad.tasks import IGNORE


def class_counts(pred, target, num_classes: int):
  """(tp, support, predicted) per class [num_classes] over the scored positions."""
  valid = target != IGNORE
  t = jnp.where(valid, target, 0).reshape(-1)
  p = jnp.where(valid, pred, 0).reshape(-1)
  w = valid.reshape(-1).astype(jnp.float32)
  seg = lambda x, ids: jax.ops.segment_sum(x, ids, num_segments=num_classes)
  return seg(w * (p == t), t), seg(w, t), seg(w, p)


def macro_accuracy(pred, target, num_classes: int):
  """torchmetrics' multiclass accuracy with average='macro' (its default) and ignore_index."""
  tp, support, predicted = class_counts(pred, target, num_classes)
  present = support + predicted - tp > 0
  recall = jnp.where(support > 0, tp / jnp.maximum(support, 1.0), 0.0)
  return jnp.sum(jnp.where(present, recall, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def micro_counts(pred, target):
  """(correct, scored) position counts."""
  valid = target != IGNORE
  return jnp.sum(valid & (pred == target)), jnp.sum(valid)


def token_nll(logits, target):
  """(sum of -log p(target), scored count) over positions whose target is not ignored."""
  valid = target != IGNORE
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, lse - picked, 0.0)), jnp.sum(valid)


def batch_metrics(logits, target, num_classes: int):
  """MAD's per-batch values: macro accuracy, perplexity exp(mean nll); plus micro counts."""
  pred = jnp.argmax(logits, axis=-1)
  nll, count = token_nll(logits, target)
  correct, scored = micro_counts(pred, target)
  return {"acc": macro_accuracy(pred, target, num_classes),
          "ppl": jnp.exp(nll / jnp.maximum(count, 1)),
          "correct": correct, "scored": scored}
