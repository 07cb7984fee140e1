"""pytest plugin entry point (fixtures and options arrive with the plugin work)."""
