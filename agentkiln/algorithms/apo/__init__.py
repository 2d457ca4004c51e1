"""APO (prompt optimization): `config` (OptimizerLLM) beside `algorithm` (kiln.APO); `prompts` holds the text side."""

from agentkiln.algorithms.apo.algorithm import APO, Candidate
from agentkiln.algorithms.apo.config import OptimizerLLM
from agentkiln.algorithms.apo.prompts import check_candidate, extract_prompt, final_answer, placeholders

__all__ = ["APO", "Candidate", "OptimizerLLM", "check_candidate", "extract_prompt", "final_answer", "placeholders"]
