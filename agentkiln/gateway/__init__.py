"""The OpenAI-compatible gateway, split like vLLM's OpenAI server.

`router` builds the routes; `chat_completions/` and `responses/` each hold an API's wire models
and builders (`protocol`) and its handler (`serving`); `models` serves `/v1/models`. The shared
call flow (target lookup, engine call, span recording, error mapping) is `call.GatewayCall`;
`errors`, `sse`, `incoming`, `wire` and `recording` are the pieces both APIs use.
"""
