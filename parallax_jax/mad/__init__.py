"""MAD (Poli et al. 2024) synthetic tasks for the attention family.

tasks: the six seeded generators and MAD's difficulty settings; metrics: MAD's accuracy.
"""
from parallax_jax.mad.tasks import (IGNORE, TASKS, Dataset, TaskSetting, baseline, generate,
                                    make_dataset, settings)

__all__ = ["IGNORE", "TASKS", "Dataset", "TaskSetting", "baseline", "generate", "make_dataset",
           "settings"]
