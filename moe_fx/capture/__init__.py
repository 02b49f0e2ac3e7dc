"""Capture: getting a model's MoE blocks into FX graphs that the passes can match.

Dynamo fails or splits on what MoE code often does; each module here handles one such case: graph breaks where
the capture flags would fail the whole compile (`breaks`), HF's `eager` experts traced as `batched_mm`
(`hf_experts`), experts loops that never reach a graph as one opaque op (`opaque_experts`), loops over the
experts hit (`hit_loops`), calls holding objects export cannot take (`passthrough`), and what `apply`'s capture
assumed, checked on every call (`guards`). `switch` is the context the trace-time substitutions test.
"""
