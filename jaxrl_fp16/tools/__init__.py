"""The tools around the library: precision studies (`analysis`, `fp16_check`, `study`, `sanity`, `sweep`, `plots`)
and host tools (`doctor`, `plan`, `smoke`). Each backs a `jaxrl-fp16` command; none is imported by the training core.
"""
