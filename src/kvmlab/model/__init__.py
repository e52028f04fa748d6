"""model: typed recipes and the records passed between steps."""
