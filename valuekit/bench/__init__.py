"""`valuekit bench`: benchmarks and study suites (speed, layer, stream, epoch, scale, quality, the value/subset grids,
the text suites, peers). It imports the product; nothing in the product imports it."""
