"""Many runs at once: grids of configs as Ray tasks (``maestro-fl sweep``) and the method comparison."""
