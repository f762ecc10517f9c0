"""One module per verb; each defines ``command`` (a click command). Found by name, imported on use."""
