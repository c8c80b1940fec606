"""Training support shared by the recipes: offline metrics and local-file dataset loaders."""
