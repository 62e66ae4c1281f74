"""The live-migration engine: the exchange's two sides (`source`, `target`), the link they talk
over, post-copy's halves, the page streams, convergence, the receiver around the target, the
settling of an in-doubt hand-over (`resolve`)."""
