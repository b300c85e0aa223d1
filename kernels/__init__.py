"""C sources of edgesmith's own kernels, shipped so the sdk can build them for a device's ISA."""
