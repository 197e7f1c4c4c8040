"""MAD (Poli et al. 2024) synthetic tasks for the attention family; see docs/mad.md.

tasks: the six seeded generators and MAD's difficulty settings; model: MAD's default model
with any family member as its mixer; train: the protocol, a whole lr x wd x seed sweep as one
vmapped program; report: scores, tables, chart. CLI: `python -m parallax_jax.mad`.
"""
from parallax_jax.mad.model import MADModel, ModelConfig, init_params, member_spec
from parallax_jax.mad.report import scores
from parallax_jax.mad.tasks import (IGNORE, TASKS, Dataset, TaskSetting, baseline, generate,
                                    make_dataset, settings)
from parallax_jax.mad.train import OPTIMIZERS, Protocol, run_setting

__all__ = [
    "IGNORE", "OPTIMIZERS", "TASKS", "Dataset", "MADModel", "ModelConfig", "Protocol",
    "TaskSetting", "baseline", "generate", "init_params", "make_dataset", "member_spec",
    "run_setting", "scores", "settings",
]
