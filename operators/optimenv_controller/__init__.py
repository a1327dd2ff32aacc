"""The optimenv controller: reconciles OptimEnv resources into ConfigMaps and jobs."""
