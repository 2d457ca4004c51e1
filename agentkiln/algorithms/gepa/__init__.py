"""GEPA (reflective prompt evolution with the `gepa` library): `config` (GEPAConfig) beside
`algorithm` (kiln.GEPA); `feedback` turns recorded traces into the reflective dataset."""

from agentkiln.algorithms.gepa.algorithm import GEPA
from agentkiln.algorithms.gepa.config import GEPAConfig
from agentkiln.algorithms.gepa.feedback import trace_record

__all__ = ["GEPA", "GEPAConfig", "trace_record"]
