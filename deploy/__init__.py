"""Running a real consortium: Flower's SuperLink and SuperNodes over TLS with node authentication.

- :mod:`twinfed.deploy.certs`: the consortium CA, the SuperLink's TLS certificate and the
  SuperNodes' authentication keys (the only module that writes private key bytes here).
- :mod:`twinfed.deploy.processes`: one long-running Flower process with its own log file and
  process group, stopped with SIGTERM then SIGKILL.
- :mod:`twinfed.deploy.flower`: the command lines of ``flower-superlink``, ``flower-supernode``
  and ``flwr``, and the CLI's connection file.
- :mod:`twinfed.deploy.launcher`: a whole consortium on loopback (``twinfed deploy local``).
"""
