"""Reading and writing foreign checkpoint formats."""
