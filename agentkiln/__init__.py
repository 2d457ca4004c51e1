"""AgentKiln: an optimization layer that makes AI agents better from their own runs."""

__version__ = "0.1.0"
