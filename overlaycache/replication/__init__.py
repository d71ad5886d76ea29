"""Replication of a volume's regions to the secondary: the maps (:mod:`.maps`), the modes as policy
objects (:mod:`.modes`) and the replicator that ships and publishes (:mod:`.replicator`)."""

from overlaycache.replication.modes import MODES, Mode, mode_for
from overlaycache.replication.replicator import SYNC_POLICIES, Lag, Replicator, attach

__all__ = ["Lag", "MODES", "Mode", "Replicator", "SYNC_POLICIES", "attach", "mode_for"]
