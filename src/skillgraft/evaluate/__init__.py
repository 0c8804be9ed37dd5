"""Evaluators: the micro-world suites (`skillgraft.evaluate.microworld`), and later JSONL VQA and external commands."""
