"""Exports of recorded runs in other trainers' own layouts (verl, LLaMA-Factory); `adapter.export` is our JSONL."""
