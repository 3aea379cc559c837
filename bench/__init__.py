"""``caresync bench``: the fan-out benchmark on a fresh embedded deployment.

``workload`` builds the seeded commands (the Restate peer's ``build_events``), ``fanout`` runs
the router in its own process and measures it, ``raw_loop`` is the plain nats-py baseline doing
the same message moves, ``report`` prints and records the figures, ``cli`` ties them together.
"""
