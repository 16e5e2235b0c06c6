"""The allowed names of every choice, one list each: the library checks its arguments against them and
:func:`clipexp.config.validate.validate` checks the run config against the same lists."""

DOMAINS = ("general", "medical", "industrial", "scientific")
MINING_STRATEGIES = ("semi-hard", "hard", "weighted")
SCHEDULES = ("constant", "warmup", "cosine", "exponential", "adaptive")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SOURCES = ("csv", "json", "folder", "hf", "textile", "webdataset")
ON_ERROR = ("raise", "skip")
CACHE_MODES = ("auto", "memory", "disk", "none")
INTERPOLATION_NAMES = ("bicubic", "bilinear", "nearest")  # clipexp.data.images.INTERPOLATIONS
ACCUMULATION = ("plain", "exact")
MONITOR_MODES = ("max", "min")
HEADS = ("zero_shot", "prototype", "knn", "linear", "tip")  # clipexp.heads: classifiers on the image embeddings
CONFORMAL_SCORES = ("lac", "aps")  # clipexp.heads.conformal: conformity scores of the prediction sets
