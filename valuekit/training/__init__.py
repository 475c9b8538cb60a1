"""The one training loop and what it hands a method: batches, samplers, the context, eval mode, in-run signals, options
and their validation, checkpoints, precision, threads and torchrun handshakes."""
