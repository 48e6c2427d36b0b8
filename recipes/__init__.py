"""YAML recipes runnable with `posttrain train`."""
