"""core: errors, settings, the one process runner, files, stamps, terminal output."""
