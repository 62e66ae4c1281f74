"""Device models: sans-IO, each with a state dataclass and save()/restore(state).

`virtio` holds the virtio-mmio devices (blk, console, rng): bus devices too, but with a worker
thread each, so they also have pause()/resume()/stop(), which `Machine` calls with its own.
"""
