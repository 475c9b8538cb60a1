"""The run directory: file names and schemas, atomic writes, the lock, the part writers, the run writer and the reader
(`Run`). Torch-free."""
