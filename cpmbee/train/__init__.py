"""Training infrastructure shared by pre-training and fine-tuning.

* ``metrics`` — a metrics record per step fanned out to sinks: JSONL (source of truth, one file per day),
  TensorBoard, console progress. Dashboards and daily reports read the JSONL.
* ``checkpointing`` — atomic, resumable checkpoints: model (safetensors), optimizer/scheduler (weights-only
  torch files), RNG and data positions (JSON); keep-last-k; a ``latest`` pointer that is never torn.
* ``schedule`` — learning-rate schedules with warm-up (constant, linear, cosine, the original's Noam).

Nothing here knows about the model's internals; the core package never imports this one.
"""
