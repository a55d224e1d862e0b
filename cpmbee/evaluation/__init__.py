"""Evaluation: likelihood and generation scoring of CPM-Bee tasks, perplexity, and the lm-eval adapter.

* ``likelihood`` — the answer scorer (batched forwards through ``AnswerObjective``) and fine-tuning's
  ``evaluate``;
* ``answer_metrics`` — exact match and token F1 (character-level for CJK), parsing generated answers to options;
* ``perplexity`` — plain text as CPM-Bee LM input, token-level NLL;
* ``tasks`` — ``run_task``, behind ``cpmbee eval``: task files, kinds, the JSON report and its table;
* ``converters`` — ZeroCLUE / English benchmark rows → CPM-Bee prompts;
* ``lm_eval_adapter`` — the ``cpmbee`` model for lm-evaluation-harness (needs the ``eval`` extra).

Nothing in the core package imports this one.
"""
