"""Pure transforms of live state: model state and tied weights, key matching and load reports,
optimizer state by name."""
