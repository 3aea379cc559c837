"""``caresync bench``: the fan-out benchmark on a fresh embedded deployment.

``workload`` builds the seeded commands (the Restate peer's ``build_events``), ``refdata`` the
reference data they are decided with, ``expected`` runs the pure actors over them (what the
router must do), ``fanout`` runs the router in its own process and measures and checks it,
``raw_loop`` is the plain nats-py baseline doing the same number of message moves, ``report``
prints and records the figures, ``cli`` ties them together.
"""
