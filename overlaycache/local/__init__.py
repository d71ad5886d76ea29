"""The local side of a volume: geometry, layers (base and overlays), volume metadata, the layer
stack and the map of unavailable regions."""
