"""One device's local scheduling, as one value: each model's admission policy and the step policy
between the device's models, with the SLOs and step costs they need. The server, the bench and the
simulator all describe a device's scheduling this way (`Fleet(scheduling=...)`);
`serving.runtime.device_runtime.assemble_device` builds it into the engines and the runtime.
Defaults: FCFS admission, round-robin stepping (docs/scheduling.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

from serving.engine.llm_engine import LLMEngine
from serving.engine.scheduler import AdmissionPolicy, FCFSAdmission
from serving.scheduling.admission import ADMISSIONS, admission_policy
from serving.scheduling.cost_model import StepCost
from serving.scheduling.slo import SLO
from serving.scheduling.step_policy import STEP_POLICIES, step_policy

log = logging.getLogger("fineserve.scheduling")


@dataclass(frozen=True)
class LocalScheduling:
    admission: str = "fcfs"                 # one of ADMISSIONS
    step_policy: str = "round_robin"        # one of STEP_POLICIES
    slos: Mapping[str, SLO] = field(default_factory=dict)                  # per model (EDF, SAAB)
    step_costs: Mapping[str, StepCost | None] = field(default_factory=dict)  # per model (SAAB)

    def __post_init__(self):
        if self.admission not in ADMISSIONS:
            raise ValueError(f"unknown admission {self.admission!r}; choose from {ADMISSIONS}")
        if self.step_policy not in STEP_POLICIES:
            raise ValueError(f"unknown step policy {self.step_policy!r}; choose from {STEP_POLICIES}")

    def admission_for(self, name: str) -> AdmissionPolicy:
        """`name`'s admission policy: SAAB needs the model's step cost, and a model without one
        (the device's profile does not cover it) admits FCFS."""
        cost = self.step_costs.get(name)
        if self.admission != "fcfs" and cost is None:
            log.info("%s: no step-cost profile for this device, so FCFS admission instead of SAAB", name)
            return FCFSAdmission()
        return admission_policy(self.admission, cost, self.slos.get(name))

    def policy_for(self, engines: Mapping[str, LLMEngine], step_seconds: Mapping[str, float]):
        return step_policy(self.step_policy, engines, self.slos, step_seconds)
