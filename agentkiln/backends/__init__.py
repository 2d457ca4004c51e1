"""Training backends other than AgentKiln's own learner (agentkiln.training): TRL, ...

Each backend trains on the same records our learner does (`Transition`, `PreferencePair`) and
writes a peft adapter folder the engine serves, so the rest of the loop (publish, serve, canary)
does not know which backend trained.
"""
