"""Default configuration files shipped with the node."""
