"""Applications built on the library: the demo, the showcase and the CPU reproduction."""
