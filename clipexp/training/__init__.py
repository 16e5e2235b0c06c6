"""The trainer: the recipe (:mod:`~clipexp.training.trainer`), the Hydra task around it (:mod:`~clipexp.training.task`),
and one module per concern it sets up: data loaders, optimizer, checkpoints and resume, batch size and
out-of-memory recovery, GradCache, distributed, robust fine-tuning."""
