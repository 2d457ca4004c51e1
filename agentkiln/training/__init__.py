"""The training machinery GRPO, SFT and APO share: the causal-LM learner and its losses, the
trace of a finished rollout, and the loop that publishes, validates, keeps history and resumes.

Modules: `config` (LearnerConfig, LoraSettings), `learner`, `losses`, `packing` (micro-batch
layouts), `head` (sliced output layer), `device`, `trace`, `context` (what an algorithm is
handed), `policies` (which learners a run trains), `loop`, `settings` (dotted-path overrides).
"""
