"""Tool-call parsers, one per model family (like vLLM's): how a model writes calls and how to read them back."""
