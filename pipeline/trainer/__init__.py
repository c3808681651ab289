"""The training recipes (torchtune's shape on accelerate's primitives: ``setup``, ``train``, ``save``).

- ``session``: ``Recipe``, what DPO and SFT share around their step (run folder, accelerator, trackers and
  metrics log, optimizer and wrapping, the step loop, resume, checkpoints and the final model).
- ``accelerator`` (the run's accelerator, peak memory), ``optim`` (optimizer, schedule and their checks),
  ``batching`` (the data order), ``policy`` (LoRA, checkpointing, k-bit preparation of a loaded model):
  what ``session`` and both recipes build with.
- ``args``: ``TrainingArgs``, the fields both configs share (optimizer, schedule, LoRA, checkpoints, logging,
  hub), each declared once with its docstring and range.
- ``dpo_config`` / ``dpo_step`` / ``dpo_checks`` / ``dpo_recipe``: DPO against the reference-score cache.

The stages (``stages/train.py``, ``stages/sft.py``) only build the config and call ``run``.
"""
