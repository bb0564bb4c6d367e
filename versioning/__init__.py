"""The ground floor that serving and training share: versions of the models and what guards them.

No torch at import, no FastAPI. (Not named ``registry``: that is the default runtime
directory of the registry's files, ``trainer.registry_dir``, ignored by git.)

- ``registry``: the model registry (versions with manifests and checksums, the current and
  canary pointers, atomic publication and retention);
- ``probe``: the swap probe (fixed-prefix top-k log-probs a trainer stores with a version and
  a gateway compares with what vLLM serves);
- ``lock``: the round lock and the canary gate's lock (PostgreSQL advisory lock, else a file lock).

Floors (imports point down only; ``tests/test_floors.py`` checks it): versioning → gateway →
trainer → toyworld (the toy world and the loop's evaluation) → loadtest. This package
imports none of the others.
"""
