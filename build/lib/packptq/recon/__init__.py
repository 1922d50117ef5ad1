"""Reconstruction: one unit (``unit``: the activation cache and the Lightning fit) and the
sequence of units over a model (``sequence``: planning and the loop)."""
from packptq.recon.sequence import ReconSequence, Unit, load_unit_state, plan_units, unit_iters, unit_state
from packptq.recon.unit import ActivationCache, ReconConfig, UnitReconstruction, reconstruct_unit

__all__ = ["ActivationCache", "ReconConfig", "ReconSequence", "Unit", "UnitReconstruction", "load_unit_state",
           "plan_units", "reconstruct_unit", "unit_iters", "unit_state"]
