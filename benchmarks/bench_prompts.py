"""The prompts of the throughput benchmarks: the same texts in every engine, so that their ratios compare."""

# bench_llamacpp.py takes the first --prompts of these
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "My favourite food is",
    "In 1905, Albert Einstein published",
    "The best way to learn",
    "Dear hiring manager,",
    "She opened the door and",
    "The history of Rome",
    "To bake bread, first",
    "Breaking news:",
    "He looked at the sky and",
    "The recipe calls for",
]
# the batched benchmarks (vLLM, bat serve, transformers) cycle through these
CYCLED = PROMPTS[:8]
