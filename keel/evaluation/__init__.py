"""EM evaluation: question files, sampling, judges (endpoint, local HF, cached), metrics with bootstrap CIs.

Modules: ``questions`` (upstream YAML / our JSONL), ``generation`` (HF generate, vLLM), ``judge_base``
(the one Judge interface), ``judges`` (OpenAI-compatible, local HF), ``cache`` (SQLite judge cache),
``metrics`` (EM, coherence, missing judgements, ``bootstrap_ci``), ``pipeline`` (files, summary, W&B),
``rundir`` (the output folder's status.json, resume and refusal). Import the submodule
you need; this package imports nothing heavy on its own.
"""
