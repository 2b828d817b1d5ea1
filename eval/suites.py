"""Evaluation suites: a name -> the benchmarks it runs (keys of eval.datasets.DATASETS)."""

SUITES: dict[str, tuple[str, ...]] = {
    "zero_shot": ("ucf101", "moments", "msrvtt", "youcook2", "didemo"),  # the paper's Section 4
    "action": ("ucf101", "moments"),
    "retrieval": ("msrvtt", "youcook2", "didemo"),
}
