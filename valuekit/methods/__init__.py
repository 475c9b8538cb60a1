"""The methods: one module per published method (uniform, dds, multidds, lrdi with l2rw and mwnet, bads, hostcp),
each a registered `Method` subclass (`valuekit.methods.base`) driven by the one loop in `valuekit.training`.
A method trains on the batches it is given and returns its own value columns; the loop owns everything else."""
