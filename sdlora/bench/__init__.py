"""Not the product's core: benchmarks, the shapes world that the shipped base and the demo are made of, and the
quality measures read off its pictures."""

