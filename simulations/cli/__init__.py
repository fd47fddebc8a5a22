"""The ``fedlora`` command line (``fedlora = fedlora.simulations.cli.main:main``; also
``python -m fedlora.simulations.cli``) and the launchers it drives.

- ``main``: the entry point: argument parsing, ``config``, ``keys``, ``certs``, ``verify``
- ``simulate``: ``fedlora simulate``, one local multi-tenant run end to end
- ``deploy``: ``fedlora deploy superlink|supernode|register|run``
- ``release``: ``fedlora dpo|merge|publish``, one release stage each
- ``deployment``: Flower's Deployment Engine: command lines, a local federation, a run and its report
- ``launcher``: Flower's simulation engine, and starting, streaming and stopping processes
- ``memory``: peak memory of the whole process tree of a run
- ``tenant_node``: a tenant's deployment node: its SuperNode and its tenant worker, supervised
- ``supernode_poll``: ``flower-supernode`` with a shorter idle poll than Flower's fixed 3 s
"""
