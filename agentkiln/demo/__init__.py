"""The CPU demo: a calculator-tool agent that learns arithmetic word problems with GRPO."""
