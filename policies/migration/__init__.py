"""Migration policies: which running decodes move where (cpsim.protocols.MigrationPolicy).

- ``kv_balance``: from instances about to run out of KV cache (counting their queues) to
  roomy ones, the cheapest decodes to copy first, as Llumnix rebalances.

The driver (backends/sim/migration.py in simulation) copies each request's KV over the KV
link while it keeps decoding, then stops it for the last copy and hands it over.
"""

from __future__ import annotations

from typing import Any

from cpsim.protocols import MigrationPolicy
from cpsim.validation import lookup
from policies.migration.kv_balance import KVBalancePolicy

MIGRATION_POLICIES: dict[str, type[MigrationPolicy]] = {"kv_balance": KVBalancePolicy}


def make_migration_policy(name: str, **kwargs: Any) -> MigrationPolicy:
    """Build the migration policy registered as ``name``; unknown names raise ValueError."""
    return lookup(MIGRATION_POLICIES, name, "migration policy")(**kwargs)


__all__ = ["MIGRATION_POLICIES", "KVBalancePolicy", "make_migration_policy"]
