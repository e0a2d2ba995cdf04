"""gRPC adapters: thin servicers over the domain classes, and the interceptors around them."""
