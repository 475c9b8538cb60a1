"""Differentiable operations the methods are built from: per-example losses and gradient dot products, and the convex
subset-selection layer with its exact solvers."""
