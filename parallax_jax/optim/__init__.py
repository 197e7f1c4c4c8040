"""Optimizers: Muon for hidden matrices with role-based routing to AdamW. See docs/muon.md."""
from parallax_jax.optim.diagnostics import stable_rank, stable_ranks, update_rms
from parallax_jax.optim.muon import (MUON_STATIC_ARGS, ScaleByMuonState, add_decayed_weights, muon,
                                     scale_by_muon)
from parallax_jax.optim.newton_schulz import (POLAR_EXPRESS, QUINTIC, ns_coefficients, orthogonalize, scalar_map,
                                              singular_value_band)
from parallax_jax.optim.routing import (ADAM, DEFAULT_RULES, MUON, MatrixView, Routing, Rule, describe, matrix_views,
                                        param_labels)

__all__ = [
    "ADAM", "DEFAULT_RULES", "MUON", "MUON_STATIC_ARGS", "POLAR_EXPRESS", "QUINTIC", "MatrixView",
    "Routing", "Rule",
    "ScaleByMuonState", "add_decayed_weights", "describe", "matrix_views", "muon", "ns_coefficients",
    "orthogonalize", "param_labels", "scalar_map", "scale_by_muon", "singular_value_band", "stable_rank",
    "stable_ranks", "update_rms",
]
