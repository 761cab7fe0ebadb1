"""Models: the zoo, graph extraction, partitioning and the runtimes that run the pieces."""
