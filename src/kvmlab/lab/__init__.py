"""lab: the step registry, the whole pipeline, its lock, remote hosts, checks runner."""
