"""Zoo model modules; importing this package registers every model."""
