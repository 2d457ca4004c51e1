"""Agents written the normal way for each framework, with only their OpenAI base URL pointed at AgentKiln.

Run one with `kiln run examples.<module>:<function> --server http://127.0.0.1:4747`.
"""
