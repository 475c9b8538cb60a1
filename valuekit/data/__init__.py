"""Tables in, datasets out: reading and validating training/dev tables (numeric, images, text, instruction sets), the
bundled and preparable data sets with their noise injection, and the row views that stream images and token ids to
the device."""
