"""A model's life in MLflow: resolve a URI to one version, register new versions, fetch a
version's files into the node's cache and load it once per process, and the tracking defaults."""
