"""fastlm's benchmark suite (`python -m benchmarks`) and static kernel report (`python -m benchmarks.static`).

`harness.py` holds the machinery every op family shares (timing, memory, the copy-bandwidth ceiling, result files);
each `benchmarks/<op>.py` declares one family's cases and providers as a `harness.Family` named FAMILY, and
`__main__` runs every module here that has one. Committed results live under `benchmarks/results/<device>/`.
"""
