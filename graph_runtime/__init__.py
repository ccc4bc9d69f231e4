"""graph_runtime package."""
