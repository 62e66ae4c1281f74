"""Device models: sans-IO, each with a state dataclass and save()/restore(state)."""
