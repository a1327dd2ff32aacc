"""Worker bootstrap: apply a worker spec inside each pod or Ray worker before Accelerate starts."""
