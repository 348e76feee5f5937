"""Speed benchmarks and GPU checks; run each as `python -m benchmarks.<name>` from the checkout's root."""
