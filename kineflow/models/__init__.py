"""Model backbones and heads."""
