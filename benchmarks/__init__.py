"""GPU checks and timing scripts; not installed. Run from the repository root:

python -m benchmarks.gpu_check --sections correctness,bench
"""
