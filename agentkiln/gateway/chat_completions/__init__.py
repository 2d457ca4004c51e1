"""OpenAI `/v1/chat/completions`: wire models and builders (protocol) and the handler (serving)."""
