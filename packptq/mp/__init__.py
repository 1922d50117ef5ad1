"""Pack-wise mixed precision.

Modules, lowest first: ``config`` (the typed ``mp`` section, the allocator interface, the
problem it solves and the allocation it returns, its registry, the activation bits that go with
weight bits), ``solver`` (the exact multiple-choice knapsack), ``allocators`` (the registered
policies none/budget/official, feasibility), ``accounting`` (weight counts, average bits,
storage, ``bits.json``), ``sensitivity`` (per-pack KL on the model, the bit setter) and ``plan``
(the pipeline side, ``MixedPrecision``).

The pipeline calls ``plan(mp_section, qcfg)``, then on the returned ``MixedPrecision`` (None for
``mp.policy=none``) ``check_feasible``, ``needs_omega`` and ``describe``; the bits phase is
``run(ctx, plan, ...)`` (``allocate`` with a plan, ``bit_accounting(qmodel)`` for every run).
Note that ``packptq.mp.plan`` as an attribute is the function; the module is
``sys.modules["packptq.mp.plan"]``."""
from packptq.mp.config import (ALLOCATORS, MAX_BITS, MIN_BITS, Allocation, Allocator, MPConfig, MPProblem,
                               act_bits, boundary_bits, resolve_candidates)
from packptq.mp.allocators import allocate, check_feasible, cost_table, feasible_range, make_problem, omega_costs
from packptq.mp.solver import Solution, budget_bits, solve_mckp
from packptq.mp.accounting import (avg_act_bits, avg_weight_bits, bit_accounting, bits_json,
                                   load_bits_json, model_size_bytes, weight_count, weight_counts)
from packptq.mp.sensitivity import kl_sensitivity, set_group_bits
from packptq.mp.plan import Bits, MixedPrecision, plan, run

__all__ = [
    "ALLOCATORS", "MAX_BITS", "MIN_BITS", "Allocation", "Allocator", "Bits", "MPConfig", "MPProblem",
    "MixedPrecision", "Solution", "act_bits", "allocate", "avg_act_bits", "avg_weight_bits",
    "bit_accounting", "bits_json", "boundary_bits", "budget_bits", "check_feasible", "cost_table",
    "feasible_range", "kl_sensitivity", "load_bits_json", "make_problem", "model_size_bytes",
    "omega_costs", "plan", "resolve_candidates", "run", "set_group_bits", "solve_mckp", "weight_count",
    "weight_counts",
]
