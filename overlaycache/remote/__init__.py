"""The secondary's side of a volume: object layout, PIT map trees, the region source, the region cache
and the catalog (volumes, snapshots, images) read from a store alone."""
