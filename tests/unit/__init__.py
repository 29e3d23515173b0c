"""Pure unit tests of the scheduling core: cost model, batcher, assignment, policies."""
