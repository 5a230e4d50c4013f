"""Model inputs shared by training and sampling: sequence layouts, image preprocessing,
input checks."""
