"""Ready-made wiring of unifeat feature models into other libraries' heads."""
