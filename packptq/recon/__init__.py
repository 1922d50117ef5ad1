"""Reconstruction: one unit (``unit``: the activation cache and the Lightning fit) and the
sequence of units over a model (``sequence``: planning, the loop and the phase entry ``run``)."""
from packptq.recon.sequence import (ReconResult, ReconSequence, Unit, load_unit_state, plan_units, run, unit_iters,
                                    unit_state)
from packptq.recon.unit import ActivationCache, ReconConfig, UnitReconstruction, UnitRun, reconstruct_unit

__all__ = ["ActivationCache", "ReconConfig", "ReconResult", "ReconSequence", "Unit", "UnitReconstruction", "UnitRun",
           "load_unit_state", "plan_units", "reconstruct_unit", "run", "unit_iters", "unit_state"]
