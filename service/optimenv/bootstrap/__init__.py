"""Worker bootstrap: apply a worker spec inside each pod or Ray worker before Accelerate starts.

Three ways to run it (``docs/bootstrap.md``): ``optimenv-bootstrap [--spec PATH] -- COMMAND`` (exec
mode, the pod entrypoint), ``python -m optimenv.bootstrap run SCRIPT`` or :func:`apply` at the top
of a script (in-process), and ``optimenv ray-launch`` / :func:`optimenv.bootstrap.ray.prepare_worker`
(Ray Train workers). Nothing heavy is imported here: torch, transformers and accelerate only when a
deferred step needs them, Ray only in :mod:`optimenv.bootstrap.ray`.
"""

from optimenv.bootstrap._apply import Applied, BootstrapError, Decision, Variable, apply

__all__ = ["Applied", "BootstrapError", "Decision", "Variable", "apply"]
