"""A hostile tenant, for measuring what the server survives (none of it is product code).

- ``hostile_app``: a ClientApp that runs fedlora's own ClientApp and, on one tenant,
  rewrites its training reply (scaled, sign-flipped, noise, inflated example count).
- ``harness``: writes the tenants (one of them optionally label-flipped), runs the real
  ServerApp with the hostile ClientApp on Flower's simulation engine, and scores the final
  adapter on the honest tenants' holdouts; ``python -m fedlora.simulations.attacks.harness``.
"""
