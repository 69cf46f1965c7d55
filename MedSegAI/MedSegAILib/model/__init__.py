"""The model folder (model.json, its schema) and the backends that run its network."""
