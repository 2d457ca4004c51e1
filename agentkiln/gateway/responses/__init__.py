"""OpenAI `/v1/responses`: wire models, builders and stream events (protocol) and the handler (serving)."""
