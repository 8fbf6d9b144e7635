"""The GPU device run: a bundle of what a bare CUDA machine lacks, sent in parts that fit
one transfer each, and one script that measures the GPU path on it (see README, "On a GPU")."""
