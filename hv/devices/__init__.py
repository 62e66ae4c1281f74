"""Device models: sans-IO, each with a state dataclass, `hv.persist.Persist` (save() -> State,
restore(State), validated first) and a declared wire `KIND`.

`virtio` holds the virtio-mmio devices (blk, console, rng): bus devices too, but with a worker
thread each, so they also implement `hv.persist.Lifecycle` (pause/resume/stop), which `Machine`
calls with its own.
"""
